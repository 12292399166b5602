//! Routing policy: which providers may serve a product for a number, in order.

use serde::Deserialize;

use crate::model::{Product, ProviderName};
use crate::phone::Phone;

/// One `[[routing.rules]]` entry: the first rule matching the product (and the
/// number's country, when `countries` is given) decides the provider chain.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RoutingRule {
    pub product: Product,
    #[serde(default)]
    pub countries: Option<Vec<String>>,
    pub providers: Vec<ProviderName>,
}

impl RoutingRule {
    fn matches(&self, product: Product, phone: &Phone) -> bool {
        self.product == product
            && match &self.countries {
                None => true,
                Some(countries) => {
                    phone.region().is_some_and(|region| countries.iter().any(|c| c.eq_ignore_ascii_case(region)))
                }
            }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Routing {
    rules: Vec<RoutingRule>,
}

impl Routing {
    pub fn new(rules: Vec<RoutingRule>) -> Self {
        Routing { rules }
    }

    /// The ordered provider chain of the first matching rule, or `None`.
    pub fn chain(&self, product: Product, phone: &Phone) -> Option<&[ProviderName]> {
        self.rules.iter().find(|r| r.matches(product, phone)).map(|r| r.providers.as_slice())
    }

    pub fn rules(&self) -> &[RoutingRule] {
        &self.rules
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phone::Region;

    #[test]
    fn first_matching_rule_wins() {
        let routing = Routing::new(vec![
            RoutingRule {
                product: Product::PossessionNetwork,
                countries: Some(vec!["fr".into()]),
                providers: vec![ProviderName::Dqe],
            },
            RoutingRule {
                product: Product::PossessionNetwork,
                countries: None,
                providers: vec![ProviderName::Sandbox],
            },
        ]);
        let fr = Phone::parse("+33612345678", Region::default()).unwrap();
        let us = Phone::parse("4155550123", Region::default()).unwrap();
        assert_eq!(routing.chain(Product::PossessionNetwork, &fr), Some(&[ProviderName::Dqe][..]));
        assert_eq!(routing.chain(Product::PossessionNetwork, &us), Some(&[ProviderName::Sandbox][..]));
        assert_eq!(routing.chain(Product::Identity, &us), None);
    }
}

//! Routing policy: which providers may serve a product for a number, in
//! order, and why in that order (`RoutingDecision`, kept on the transaction).
//! A rule's `strategy` says whether its order is the configured one or one
//! re-ranked by recent outcomes (`crate::adaptive`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::model::{Product, ProviderName};
use crate::phone::Phone;

/// How a rule orders its providers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// As listed.
    #[default]
    Ordered,
    /// By each provider's recent score for the number's country and the product.
    Adaptive,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Ordered => "ordered",
            Strategy::Adaptive => "adaptive",
        }
    }
}

/// Why a start tried its providers in the order it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RoutingReason {
    /// An ordered rule: the order listed.
    Configured,
    /// The request named its `provider`.
    Requested,
    /// Adaptive, before every provider of the rule has `min_samples`
    /// outcomes in the window: the order listed.
    WarmingUp,
    /// Adaptive, a provider has fallen below `min_samples`: the order the
    /// scores last decided is kept until there is enough to judge again.
    Held,
    /// Adaptive: by score, highest first.
    Score,
    /// Adaptive: one of the others moved first, so that every provider
    /// keeps being measured (`routing.adaptive.explore`).
    Explore,
}

impl RoutingReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RoutingReason::Configured => "configured",
            RoutingReason::Requested => "requested",
            RoutingReason::WarmingUp => "warming_up",
            RoutingReason::Held => "held",
            RoutingReason::Score => "score",
            RoutingReason::Explore => "explore",
        }
    }
}

/// One provider's standing when an adaptive rule ordered its providers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProviderScore {
    pub provider: ProviderName,
    /// Outcomes in the window: decided transactions, plus the unavailable
    /// answers this replica saw that passed the start to the next provider.
    pub samples: i64,
    pub succeeded: i64,
    /// `succeeded / samples / cost`; null without samples.
    pub score: Option<f64>,
}

/// The order a start tried its providers in, and why (`routing` on the transaction).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RoutingDecision {
    pub strategy: Strategy,
    /// The rule's providers that are configured and offer the product, in the
    /// order they were to be tried; failover, the circuit breaker and each
    /// provider's eligibility for the number then apply within it.
    pub order: Vec<ProviderName>,
    pub reason: RoutingReason,
    /// Adaptive rules: the standings the order was decided from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scores: Vec<ProviderScore>,
}

/// One `[[routing.rules]]` entry: the first rule matching the product (and the
/// number's country, when `countries` is given) decides the provider chain.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RoutingRule {
    pub product: Product,
    #[serde(default)]
    pub countries: Option<Vec<String>>,
    pub providers: Vec<ProviderName>,
    #[serde(default)]
    pub strategy: Strategy,
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

    /// The first rule matching the product and number, or `None`.
    pub fn rule(&self, product: Product, phone: &Phone) -> Option<&RoutingRule> {
        self.rules.iter().find(|r| r.matches(product, phone))
    }

    /// Whether any rule orders its providers adaptively.
    pub fn any_adaptive(&self) -> bool {
        self.rules.iter().any(|r| r.strategy == Strategy::Adaptive)
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
                strategy: Strategy::Ordered,
            },
            RoutingRule {
                product: Product::PossessionNetwork,
                countries: None,
                providers: vec![ProviderName::Sandbox],
                strategy: Strategy::Ordered,
            },
        ]);
        let fr = Phone::parse("+33612345678", Region::default()).unwrap();
        let us = Phone::parse("4155550123", Region::default()).unwrap();
        let providers = |product, phone| routing.rule(product, phone).map(|r| r.providers.as_slice());
        assert_eq!(providers(Product::PossessionNetwork, &fr), Some(&[ProviderName::Dqe][..]));
        assert_eq!(providers(Product::PossessionNetwork, &us), Some(&[ProviderName::Sandbox][..]));
        assert_eq!(providers(Product::Identity, &us), None);
    }
}

//! Whether a sent code reaches the user. A provider that accepts a send
//! has not delivered it: operators drop messages, and a route can go bad
//! for one provider and not another. Each simulated provider has a delivery
//! rate (default 1.0); each code it sends is drawn against it from one
//! seeded random sequence, so a test that sends in a fixed order gets the
//! same deliveries every run. Delivered codes land in the user's inbox
//! (`GET /_admin/inbox/{phone}`), the only place a test playing the user
//! should read them; the rest are never seen and expire unconfirmed.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// The share of sent codes each provider delivers, and the seed of the draws.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryRates {
    pub idme: f64,
    pub veratad: f64,
    /// Setting the rates restarts the random sequence from this seed.
    pub seed: u64,
}

impl Default for DeliveryRates {
    fn default() -> Self {
        DeliveryRates { idme: 1.0, veratad: 1.0, seed: 0 }
    }
}

impl DeliveryRates {
    fn of(&self, provider: &str) -> f64 {
        match provider {
            "idme" => self.idme,
            "veratad" => self.veratad,
            _ => 1.0,
        }
    }

    /// Each rate is a share, 0.0 to 1.0.
    pub fn valid(&self) -> bool {
        [self.idme, self.veratad].iter().all(|rate| (0.0..=1.0).contains(rate))
    }
}

/// A code that reached the user.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    pub provider: &'static str,
    /// The provider's id of the send (ID.me's transaction id, Veratad's reference).
    pub reference: String,
    pub phone: String,
    pub code: String,
    /// Unix seconds.
    pub sent_at: u64,
}

struct Shared {
    rates: DeliveryRates,
    draws: StdRng,
    inbox: Vec<Message>,
}

/// The delivery rates, their random sequence and the user's inbox, shared
/// by every simulated provider.
#[derive(Clone)]
pub struct Delivery {
    state: Arc<Mutex<Shared>>,
}

impl Delivery {
    pub fn new(rates: DeliveryRates) -> Delivery {
        let draws = StdRng::seed_from_u64(rates.seed);
        Delivery { state: Arc::new(Mutex::new(Shared { rates, draws, inbox: Vec::new() })) }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A provider sent `code` to `phone`: drawn against its rate; delivered
    /// codes go to the inbox. Whether it was delivered.
    pub fn send(&self, provider: &'static str, reference: &str, phone: &str, code: &str) -> bool {
        let mut state = self.lock();
        let rate = state.rates.of(provider).clamp(0.0, 1.0);
        if !state.draws.random_bool(rate) {
            return false;
        }
        let sent_at = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let message =
            Message { provider, reference: reference.into(), phone: digits(phone), code: code.into(), sent_at };
        state.inbox.push(message);
        true
    }

    /// The codes delivered to `phone` (any form: the last ten digits are compared), oldest first.
    pub fn inbox(&self, phone: &str) -> Vec<Message> {
        let wanted = last_ten(&digits(phone)).to_owned();
        self.lock().inbox.iter().filter(|m| last_ten(&m.phone) == wanted).cloned().collect()
    }

    pub fn rates(&self) -> DeliveryRates {
        self.lock().rates.clone()
    }

    /// New rates; the random sequence restarts from their seed.
    pub fn set_rates(&self, rates: DeliveryRates) {
        let mut state = self.lock();
        state.draws = StdRng::seed_from_u64(rates.seed);
        state.rates = rates;
    }

    /// `GET|PUT /_admin/delivery` and `GET /_admin/inbox/{phone}`.
    pub fn admin_router(&self) -> Router {
        Router::new()
            .route("/_admin/delivery", get(get_rates).put(put_rates))
            .route("/_admin/inbox/{phone}", get(get_inbox))
            .with_state(self.clone())
    }
}

fn digits(phone: &str) -> String {
    phone.chars().filter(char::is_ascii_digit).collect()
}

fn last_ten(digits: &str) -> &str {
    &digits[digits.len().saturating_sub(10)..]
}

async fn get_rates(State(delivery): State<Delivery>) -> Json<DeliveryRates> {
    Json(delivery.rates())
}

async fn put_rates(State(delivery): State<Delivery>, Json(rates): Json<DeliveryRates>) -> Response {
    if !rates.valid() {
        let body = serde_json::json!({"error": "delivery rates are shares between 0.0 and 1.0"});
        return (StatusCode::BAD_REQUEST, Json(body)).into_response();
    }
    delivery.set_rates(rates.clone());
    Json(rates).into_response()
}

async fn get_inbox(State(delivery): State<Delivery>, Path(phone): Path<String>) -> Json<Vec<Message>> {
    Json(delivery.inbox(&phone))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seeded_rate_delivers_about_its_share_and_the_same_each_time() {
        let run = || {
            let delivery = Delivery::new(DeliveryRates { idme: 0.4, veratad: 0.95, seed: 7 });
            let idme: Vec<bool> = (0..500).map(|i| delivery.send("idme", &i.to_string(), "4155550123", "1")).collect();
            let veratad = (0..500).filter(|i| delivery.send("veratad", &i.to_string(), "+14155550124", "2")).count();
            (idme, veratad, delivery)
        };
        let (first, veratad, delivery) = run();
        let delivered = first.iter().filter(|d| **d).count();
        assert!((160..=240).contains(&delivered), "about 40%: {delivered}");
        assert!((450..=495).contains(&veratad), "about 95%: {veratad}");
        assert_eq!(run().0, first, "the same seed, the same deliveries");
        assert_eq!(delivery.inbox("(415) 555-0123").len(), delivered);
        assert_eq!(delivery.inbox("4155550124").len(), veratad);
    }

    #[test]
    fn rates_of_nothing_and_everything() {
        let delivery = Delivery::new(DeliveryRates { idme: 0.0, veratad: 1.0, seed: 1 });
        assert!(!(0..50).any(|_| delivery.send("idme", "r", "4155550123", "1")));
        assert!((0..50).all(|_| delivery.send("veratad", "r", "4155550123", "1")));
        assert!(!DeliveryRates { idme: 1.5, ..DeliveryRates::default() }.valid());
    }
}

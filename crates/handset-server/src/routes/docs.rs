//! `GET /openapi.json`: the OpenAPI 3 document, generated from the handlers
//! and types above.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::error::{ErrorOut, ErrorsOut};
use crate::input::{ConfirmIn, IdentityIn, PossessionIn};

#[derive(OpenApi)]
#[openapi(
    info(title = "handset", description = "Provider-agnostic phone verification gateway: possession (SMS code or operator network check) and carrier identity match."),
    paths(
        super::possession::start,
        super::possession::confirm,
        super::identity::start,
        super::transactions::get_transaction,
        super::transactions::get_verification,
        super::callbacks::list,
        super::callbacks::retry,
        super::health::health,
        super::health::ready,
        super::health::metrics,
        super::sandbox::operator,
        super::providers::webhook,
        super::providers::operator_return,
        openapi,
    ),
    components(schemas(PossessionIn, ConfirmIn, IdentityIn, ErrorsOut, ErrorOut)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new().scheme(HttpAuthScheme::Bearer).description(Some("Partner API key")).build(),
            ),
        );
    }
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", responses((status = 200, description = "OpenAPI 3 document")))]
pub async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

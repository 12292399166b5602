//! The error catalogue: ID.me's codes (`idme-overview-errors.txt`) plus handset's
//! own 39xx/5001/5300 codes, in one enum so that every rejection
//! and every result error carries a code, a message and (for API errors) an HTTP status.
//! Every code here is answered by some request (the API tests produce each
//! over HTTP), except ID.me's document errors, which are only passed through.

use std::borrow::Cow;
use std::time::Duration;

macro_rules! catalogue {
    ($( $variant:ident = $code:literal, $status:expr, $message:literal; )*) => {
        /// Every code handset can answer with, in the request envelope or in a
        /// transaction's `result.errors`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode { $( $variant, )* }

        impl ErrorCode {
            /// Every code, in catalogue order.
            pub const ALL: &'static [ErrorCode] = &[ $( ErrorCode::$variant, )* ];

            /// The numeric code partners see.
            pub fn code(self) -> u16 {
                match self { $( ErrorCode::$variant => $code, )* }
            }

            /// The HTTP status of a request rejected with this code; `None` for
            /// transaction result errors, which travel inside a 200/201 answer.
            pub fn http_status(self) -> Option<u16> {
                match self { $( ErrorCode::$variant => $status, )* }
            }

            /// The catalogue's message, verbatim.
            pub fn message(self) -> &'static str {
                match self { $( ErrorCode::$variant => $message, )* }
            }

            pub fn from_code(code: u16) -> Option<ErrorCode> {
                match code { $( $code => Some(ErrorCode::$variant), )* _ => None }
            }
        }
    };
}

catalogue! {
    // 401: handset's own credentials check of the partner.
    CredentialsUnknown = 1100, Some(401), "Credentials used are not associated with any account";
    AccountInactive = 1200, Some(401), "Credentials used are associated with an inactive account";
    // 403 (ID.me's 1300, 2100 and 2200 are about an account's organisation and
    // product records, which handset's partners do not have; when ID.me answers
    // them to handset they are refused credentials, never a partner's error.)
    ProductNotEnabled = 2300, Some(403), "Referenced product is not enabled for this account";
    TransactionNotOwned = 3200, Some(403), "Transaction is not owned by this account";
    VerificationNotOwned = 3300, Some(403), "Verification is not owned by this account";
    // 404
    NotFound = 4100, Some(404), "Resource not found";
    // 422
    InvalidCallbackUrl = 3100, Some(422), "Transaction parameter callback_url is invalid";
    InvalidPhone = 3101, Some(422), "Transaction parameter phone is missing or invalid";
    InvalidCode = 3102, Some(422), "Transaction parameter code is missing or not valid";
    CodeExpired = 3103, Some(422), "Transaction parameter code is expired";
    RetryLimitExceeded = 3104, Some(422), "Transaction retry limit exceeded";
    NotPossessionCheck = 3105, Some(422), "Transaction is not associated with a valid possession check";
    Minor = 3107, Some(422), "Transaction parameter birth_date indicates user is a minor";
    InvalidBirthDate = 3108, Some(422), "Transaction parameter birth_date is not in YYYY-MM-DD format";
    FileTooSmall = 3109, Some(422), "The file size is too small. Uploaded files must be greater than 40KB and less than 16MB";
    FileTooLarge = 3110, Some(422), "The file size is too large. Uploaded files must be greater than 40KB and less than 16MB";
    ImageTypeNotSupported = 3111, Some(422), "Image type not supported. Please send .jpeg, .jpg, or .png files";
    // 429
    ProductRateLimited = 5100, Some(429), "Rate limit exceeded for this product";
    AccountRateLimited = 5200, Some(429), "Rate limit exceeded for this account";
    // 500
    Internal = 5000, Some(500), "An error occurred for this account";
    // handset's own codes
    MalformedJson = 3900, Some(400), "Request body is not a valid JSON object";
    UnsupportedContentType = 3901, Some(415), "Content-Type must be application/json";
    BodyTooLarge = 3902, Some(413), "Request body is larger than 64 KiB";
    UnknownField = 3903, Some(422), "Request contains an unknown field";
    MetadataTooLong = 3904, Some(422), "Transaction parameter metadata is longer than 500 characters";
    InvalidName = 3905, Some(422), "Transaction parameter name is missing or invalid";
    IdempotencyKeyReused = 3906, Some(422), "Idempotency-Key was already used with a different request";
    IdempotencyKeyInFlight = 3907, Some(409), "A request with this Idempotency-Key is still in flight";
    NoProvider = 3908, Some(422), "No configured provider serves this product for this phone number";
    BodyTimeout = 3909, Some(408), "Request body was not received in time";
    InvalidStatsQuery = 3910, Some(422), "Query parameter since, until or group_by is invalid";
    PhoneRateLimited = 5300, Some(429), "Send limit reached for this phone number";
    NumberRangePaused = 5301, Some(429), "Sends to this number range are paused";
    ProvidersUnavailable = 5001, Some(503), "Every eligible provider is unavailable";
    // Transaction result errors (telecom)
    CannotReceiveSms = 1001, None, "Phone number cannot receive SMS message";
    SmsNotSent = 1002, None, "SMS could not be sent";
    SmsBlocked = 1003, None, "The phone number you provided is blocked from receiving text messages";
    NumberDeactivated = 1004, None, "The phone number you provided has recently been deactivated";
    DeliveryFailedRetry = 1005, None, "Something went wrong while delivering the text message. Please try again";
    NetworkCannotRoute = 1006, None, "The network was unable to route the text message to your phone";
    PhoneOrNetworkIssue = 1007, None, "The text message failed to deliver due to an issue with the phone or cellular network";
    FlaggedForFraud = 1008, None, "The phone number you provided has been flagged for fraudulent activity";
    PhoneOff = 1009, None, "The text message failed to deliver. Please make sure your phone is turned on";
    SmsNotSupported = 1010, None, "Text messaging is not supported by the phone, carrier, or data plan";
    SignInCodeFailed = 1011, None, "Something went wrong when attempting to deliver the sign in code";
    SignInCodeFailedAgain = 1012, None, "Something went wrong when attempting to deliver the sign in code";
    InvalidNameAttribute = 1013, None, "Name attribute is invalid";
    UserNotFound = 1014, None, "Could not find the user";
    // Transaction result errors (document): handset never makes these; an
    // ID.me result carrying one is passed through as it comes.
    DocumentMinor = 2001, None, "Cannot verify users under 18 years old";
    DocumentExpired = 2002, None, "The document provided is expired. Please upload a valid document";
    DocumentMismatch = 2003, None, "The front of the document does not match to the back of the document";
    DocumentUnclear = 2004, None, "Please ensure your document’s information is clear and visible, taken on a contrasting background, and all four corners are shown";
    DocumentUnverified = 2005, None, "We were unable to verify your document";
}

impl ErrorCode {
    /// Telecom result errors 1001-1014: a transaction that ends with one is final 300.
    pub fn is_telecom_result(self) -> bool {
        (1001..=1014).contains(&self.code())
    }
}

/// A rejected request: a catalogue code, its message (sometimes more precise
/// than the catalogue's, e.g. naming the unknown field) and, for 429, when to retry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?} ({}): {message}", code.code())]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: Cow<'static, str>,
    pub retry_after: Option<Duration>,
    /// The request changed something before it was refused (a wrong code
    /// used an attempt, a deadline ended the transaction): its answer is
    /// kept for `Idempotency-Key` replay like a success.
    pub recorded: bool,
}

impl ApiError {
    pub fn new(code: ErrorCode) -> Self {
        debug_assert!(code.http_status().is_some(), "{code:?} is a result error");
        ApiError { code, message: Cow::Borrowed(code.message()), retry_after: None, recorded: false }
    }

    pub fn with_message(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        ApiError { code, message: message.into(), retry_after: None, recorded: false }
    }

    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// Marks an answer given after the request changed stored state.
    pub fn recorded(mut self) -> Self {
        self.recorded = true;
        self
    }

    pub fn http_status(&self) -> u16 {
        self.code.http_status().unwrap_or(500)
    }
}

impl From<ErrorCode> for ApiError {
    fn from(code: ErrorCode) -> Self {
        ApiError::new(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.code()), "duplicate {}", code.code());
            assert_eq!(ErrorCode::from_code(code.code()), Some(*code));
        }
        assert_eq!(ErrorCode::from_code(3106), None);
    }

    #[test]
    fn statuses_follow_the_catalogue() {
        assert_eq!(ErrorCode::CredentialsUnknown.http_status(), Some(401));
        assert_eq!(ErrorCode::VerificationNotOwned.http_status(), Some(403));
        assert_eq!(ErrorCode::InvalidBirthDate.http_status(), Some(422));
        assert_eq!(ErrorCode::AccountRateLimited.http_status(), Some(429));
        assert_eq!(ErrorCode::ProvidersUnavailable.http_status(), Some(503));
        assert_eq!(ErrorCode::UserNotFound.http_status(), None);
        assert!(ErrorCode::UserNotFound.is_telecom_result());
        assert!(!ErrorCode::DocumentMinor.is_telecom_result());
    }
}

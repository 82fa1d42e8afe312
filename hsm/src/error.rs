//! The one error type of the HSM layer. Every variant says what was wrong and
//! what an operator can do about it; PKCS#11 return values are named, not
//! numbered.

use std::time::Duration;

use cryptoki::error::{Error as CkError, RvError};

/// Errors from the HSM layer.
#[derive(Debug, thiserror::Error)]
pub enum HsmError {
    #[error("cannot load the PKCS#11 module {path}: {reason}")]
    Module { path: String, reason: String },
    #[error(
        "no token labelled {label:?} in PKCS#11 module {module} (tokens present: {present}); \
         initialise it first (e.g. softhsm2-util --init-token --free --label {label})"
    )]
    TokenNotFound {
        label: String,
        module: String,
        present: String,
    },
    #[error("wrong PIN for token {0:?}")]
    PinIncorrect(String),
    #[error("the user PIN of token {0:?} is locked; unlock it with the SO PIN")]
    PinLocked(String),
    #[error("PIN source: {0}")]
    Pin(String),
    #[error("token {token:?}: no {what} labelled {label:?}")]
    ObjectNotFound {
        token: String,
        what: &'static str,
        label: String,
    },
    #[error("token {token:?}: {op} failed: {rv}")]
    Pkcs11 {
        token: String,
        op: String,
        rv: String,
        /// The failure concerns the session or the device, not this request:
        /// the session must be re-opened (and the token may be gone).
        session_lost: bool,
    },
    #[error("signer queue for token {token:?} is full ({capacity} requests waiting); retry later")]
    QueueFull { token: String, capacity: usize },
    #[error("signing request timed out after {0:?}")]
    Timeout(Duration),
    #[error("token {token:?} is unavailable (failing closed): {reason}")]
    Unavailable { token: String, reason: String },
    #[error("no token {0:?} is configured in this signer")]
    UnknownToken(String),
    #[error("the signer has shut down")]
    Shutdown,
    #[error("key {label:?} does not fit mechanism {mech}: {reason}")]
    KeyMismatch {
        label: String,
        mech: &'static str,
        reason: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("audit log {path}: {reason}")]
    Audit { path: String, reason: String },
}

pub type Result<T, E = HsmError> = std::result::Result<T, E>;

impl HsmError {
    /// Wraps a cryptoki error from operation `op` on `token`.
    pub fn pkcs11(token: &str, op: &str, err: CkError) -> Self {
        match err {
            CkError::Pkcs11(rv, _) => match rv {
                RvError::PinIncorrect => HsmError::PinIncorrect(token.to_string()),
                RvError::PinLocked => HsmError::PinLocked(token.to_string()),
                rv => HsmError::Pkcs11 {
                    token: token.to_string(),
                    op: op.to_string(),
                    rv: format!("{rv:?}"),
                    session_lost: session_lost(rv),
                },
            },
            other => HsmError::Pkcs11 {
                token: token.to_string(),
                op: op.to_string(),
                rv: other.to_string(),
                session_lost: false,
            },
        }
    }

    /// True when the error is about the session or the device rather than
    /// the request, so the session must be re-opened before anything else.
    pub fn is_session_lost(&self) -> bool {
        matches!(
            self,
            HsmError::Pkcs11 {
                session_lost: true,
                ..
            } | HsmError::PinIncorrect(_)
                | HsmError::PinLocked(_)
        )
    }
}

impl HsmError {
    /// True when the device itself is unreachable or the module lost track
    /// of it (the token is not found, its slot vanished, the module is not
    /// initialised): a network HSM's client library may need to be
    /// initialised again to reconnect.
    pub fn is_device_gone(&self) -> bool {
        match self {
            HsmError::TokenNotFound { .. } => true,
            HsmError::Pkcs11 { rv, .. } => matches!(
                rv.as_str(),
                "DeviceError"
                    | "DeviceRemoved"
                    | "SlotIdInvalid"
                    | "TokenNotPresent"
                    | "TokenNotRecognized"
                    | "CryptokiNotInitialized"
                    | "GeneralError"
            ),
            _ => false,
        }
    }
}

/// PKCS#11 v2.40 §5.1: these return values mean the session (or the token
/// behind it) is gone; anything else is about the request.
fn session_lost(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::DeviceRemoved
            | RvError::DeviceError
            | RvError::DeviceMemory
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::UserNotLoggedIn
            | RvError::GeneralError
            | RvError::CryptokiNotInitialized
    )
}

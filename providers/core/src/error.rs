use std::time::Duration;

/// The result of a provider call.
pub type Result<T> = std::result::Result<T, ProviderError>;

/// What went wrong in a provider call. Messages never contain credentials or bootstrap tokens.
///
/// Who retries what is the table in `providers/CONTRACT.md`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// The machine does not exist (or is terminated).
    #[error("machine not found: {0}")]
    NotFound(String),
    /// The cloud has no capacity for this machine type here now; another type or zone may.
    #[error("insufficient capacity: {0}")]
    InsufficientCapacity(String),
    /// An account limit stops the create.
    #[error("quota exceeded: {0}")]
    QuotaExceeded(String),
    /// The cloud asked us to slow down.
    #[error("throttled: {message}")]
    Throttled {
        /// What the cloud said.
        message: String,
        /// How long the cloud asked us to wait, when it said.
        retry_after: Option<Duration>,
    },
    /// The NodeClass configuration is wrong (the message names the field); retrying without a
    /// change cannot help.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The credentials are missing, wrong, or lack a permission.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// A passing failure (network, 5xx, timeout).
    #[error("transient error: {0}")]
    Transient(String),
    /// The backend does not support this operation.
    #[error("unimplemented: {0}")]
    Unimplemented(String),
}

impl ProviderError {
    /// The PascalCase reason, used as event reason, condition reason and metrics label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotFound(_) => "NotFound",
            Self::InsufficientCapacity(_) => "InsufficientCapacity",
            Self::QuotaExceeded(_) => "QuotaExceeded",
            Self::Throttled { .. } => "Throttled",
            Self::InvalidConfig(_) => "InvalidConfig",
            Self::Unauthorized(_) => "Unauthorized",
            Self::Transient(_) => "Transient",
            Self::Unimplemented(_) => "Unimplemented",
        }
    }

    /// Whether the same call may succeed later without a change to the NodeClass.
    /// Capacity and quota are retryable (with backoff): capacity comes back, quotas get raised.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::InsufficientCapacity(_)
                | Self::QuotaExceeded(_)
                | Self::Throttled { .. }
                | Self::Transient(_)
        )
    }

    /// Whether the error means the cloud is out of resources for this request, so an
    /// autoscaler should try another group (cluster-autoscaler's `OutOfResources`).
    pub fn is_out_of_resources(&self) -> bool {
        matches!(self, Self::InsufficientCapacity(_) | Self::QuotaExceeded(_))
    }

    /// The wait the cloud asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Throttled { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The message without the kind prefix.
    pub fn message(&self) -> &str {
        match self {
            Self::NotFound(m)
            | Self::InsufficientCapacity(m)
            | Self::QuotaExceeded(m)
            | Self::InvalidConfig(m)
            | Self::Unauthorized(m)
            | Self::Transient(m)
            | Self::Unimplemented(m) => m,
            Self::Throttled { message, .. } => message,
        }
    }
}

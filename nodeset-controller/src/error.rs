//! The errors of the NodeSet controller.

/// Why a NodeSet pass (or a removal request) failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the API server failed.
    #[error("kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    /// The NodeSet's spec cannot be acted on until it is changed.
    #[error("invalid NodeSet spec: {0}")]
    InvalidSpec(String),
    /// A removal named Nodes that are not (live) Nodes of the NodeSet.
    #[error("not Nodes of NodeSet {nodeset}: {names:?}")]
    NotChildren {
        /// The NodeSet.
        nodeset: String,
        /// The refused names.
        names: Vec<String>,
    },
    /// A removal would take the NodeSet below `spec.minSize`.
    #[error("removing {count} Nodes would take NodeSet {nodeset} below minSize {min_size}")]
    BelowMinSize {
        /// The NodeSet.
        nodeset: String,
        /// How many Nodes would be removed.
        count: usize,
        /// `spec.minSize`.
        min_size: i32,
    },
    /// Optimistic concurrency kept failing until the deadline.
    #[error("gave up after {attempts} conflicting updates of NodeSet {nodeset}")]
    Conflict {
        /// The NodeSet.
        nodeset: String,
        /// How many updates were tried.
        attempts: u32,
    },
    /// The object has no name or UID (it was not read from the API server).
    #[error("object is missing {0}")]
    MissingField(&'static str),
    /// Creating Nodes failed.
    #[error("creating Nodes failed: {0}")]
    CreateFailed(#[source] kube::Error),
    /// The watch stream of the controller failed for good.
    #[error("controller stream failed: {0}")]
    Watch(String),
    /// A call to a group-backed NodeClass's group failed.
    #[error("group operation failed: {0}")]
    Group(#[from] kube_node_provider::ProviderError),
}

impl Error {
    /// The PascalCase reason used in events, conditions and metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Kube(_) => "ApiError",
            Self::InvalidSpec(_) => "InvalidSpec",
            Self::NotChildren { .. } => "InvalidRemoval",
            Self::BelowMinSize { .. } => "BelowMinSize",
            Self::Conflict { .. } => "Conflict",
            Self::MissingField(_) => "MissingField",
            Self::CreateFailed(_) => "FailedCreate",
            Self::Watch(_) => "WatchFailed",
            Self::Group(e) => e.reason(),
        }
    }

    /// Whether waiting cannot help: the spec must change first.
    pub fn needs_change(&self) -> bool {
        matches!(
            self,
            Self::InvalidSpec(_) | Self::NotChildren { .. } | Self::BelowMinSize { .. }
        )
    }
}

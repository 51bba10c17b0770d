//! Every Google Cloud API method the backend calls, with the IAM permission it needs: the one
//! table behind the call counter, the `Unauthorized` messages and the README's least-privilege
//! list (a test checks the README against [`ALL`]).

/// One API method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Api {
    /// The REST method as Google's API reference names it.
    pub method: &'static str,
    /// The IAM permission the method requires, as the API reference lists it.
    pub permission: &'static str,
}

/// Reads the node pool (its managed instance groups, its autoscaling).
pub const GET_NODE_POOL: Api = Api {
    method: "container.projects.locations.clusters.nodePools.get",
    permission: "container.clusters.get",
};

/// Reads one managed instance group (its target size and base instance name).
pub const GET_MIG: Api = Api {
    method: "compute.instanceGroupManagers.get",
    permission: "compute.instanceGroupManagers.get",
};

/// Lists the machines of one managed instance group, with their current actions.
pub const LIST_MANAGED_INSTANCES: Api = Api {
    method: "compute.instanceGroupManagers.listManagedInstances",
    permission: "compute.instanceGroupManagers.get",
};

/// Sets one managed instance group's target size.
pub const RESIZE_MIG: Api = Api {
    method: "compute.instanceGroupManagers.resize",
    permission: "compute.instanceGroupManagers.update",
};

/// Deletes named machines of one managed instance group, lowering its target size.
pub const DELETE_INSTANCES: Api = Api {
    method: "compute.instanceGroupManagers.deleteInstances",
    permission: "compute.instanceGroupManagers.update",
};

/// Polls a zonal operation (a resize or a deletion) until it is done.
pub const GET_ZONE_OPERATION: Api = Api {
    method: "compute.zoneOperations.get",
    permission: "compute.zoneOperations.get",
};

/// Every method the backend calls.
pub const ALL: [Api; 6] = [
    GET_NODE_POOL,
    GET_MIG,
    LIST_MANAGED_INSTANCES,
    RESIZE_MIG,
    DELETE_INSTANCES,
    GET_ZONE_OPERATION,
];

/// The distinct permissions of [`ALL`], sorted: the least-privilege custom role.
pub fn permissions() -> Vec<&'static str> {
    let mut p: Vec<&'static str> = ALL.iter().map(|a| a.permission).collect();
    p.sort_unstable();
    p.dedup();
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_permissions_cover_six_methods() {
        assert_eq!(
            permissions(),
            vec![
                "compute.instanceGroupManagers.get",
                "compute.instanceGroupManagers.update",
                "compute.zoneOperations.get",
                "container.clusters.get",
            ]
        );
    }
}

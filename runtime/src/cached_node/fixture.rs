//! Realistic Nodes as the API server serves them to a watch: what a kubelet reports (images,
//! addresses, capacity, node info, its pressure conditions), managed fields, other controllers'
//! annotations, and what kube-node writes (class annotations, the MachineReady condition, an
//! owner reference to a NodeSet, the machine finalizer). Shared by the unit tests and the
//! allocation measurement (`tests/cached_node_size.rs`).

use k8s_openapi::api::core::v1::Node;

/// Node `i` of `nodesets` NodeSets; every third Node is being deleted, every fifth is
/// cordoned and tainted.
pub fn kubelet_node(i: usize, nodesets: usize) -> Node {
    let set = i % nodesets.max(1);
    let name = format!("ns-{set}-{i:05x}");
    let zone = ["a", "b", "c"][i % 3];
    let deleting = i.is_multiple_of(3);
    let cordoned = i.is_multiple_of(5);
    let images: Vec<serde_json::Value> = (0..20)
        .map(|k| {
            serde_json::json!({
                "names": [
                    format!("registry.example.com/team-{k}/app@sha256:{:064x}", k * 7919),
                    format!("registry.example.com/team-{k}/app:v1.{k}.0"),
                ],
                "sizeBytes": 10_000_000 + k * 1_000,
            })
        })
        .collect();
    let mut taints =
        vec![serde_json::json!({"key": "dedicated", "value": "batch", "effect": "NoSchedule"})];
    if cordoned {
        taints.push(serde_json::json!({
            "key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule",
            "timeAdded": "2026-03-01T10:00:00Z",
        }));
    }
    let mut metadata = serde_json::json!({
        "name": name,
        "uid": format!("{:08x}-1111-2222-3333-{:012x}", i, i * 31),
        "resourceVersion": format!("{}", 1_000_000 + i),
        "generation": 1,
        "creationTimestamp": "2026-03-01T09:00:00Z",
        "labels": {
            "beta.kubernetes.io/arch": "amd64",
            "beta.kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "node.kubernetes.io/instance-type": "m6i.xlarge",
            "topology.kubernetes.io/region": "eu-west-1",
            "topology.kubernetes.io/zone": format!("eu-west-1{zone}"),
            "failure-domain.beta.kubernetes.io/zone": format!("eu-west-1{zone}"),
            "kube-node.io/node-class": format!("class-{}", set % 10),
            "kube-node.io/nodeset": format!("ns-{set}"),
            "team": format!("team-{}", set % 7),
            "pool": "workers",
        },
        "annotations": {
            "kube-node.io/node-class": format!("class-{}", set % 10),
            "kube-node.io/node-class-generation": "3",
            "kube-node.io/build-hash": format!("{:016x}", set * 104_729),
            "kube-node.io/launched-at": format!("2026-03-01T09:{:02}:{:02}Z", (i / 60) % 60, i % 60),
            "kube-node.io/bootstrap-token": format!("bootstrap-token-{:06x}", i),
            "node.alpha.kubernetes.io/ttl": "0",
            "volumes.kubernetes.io/controller-managed-attach-detach": "true",
            "csi.volume.kubernetes.io/nodeid": format!("{{\"ebs.csi.aws.com\":\"i-{i:017x}\"}}"),
        },
        "ownerReferences": [{
            "apiVersion": "kube-node.io/v1alpha1", "kind": "NodeSet", "name": format!("ns-{set}"),
            "uid": format!("{:08x}-aaaa-bbbb-cccc-dddddddddddd", set),
            "controller": true, "blockOwnerDeletion": true,
        }],
        "finalizers": ["kube-node.io/machine"],
        "managedFields": [
            {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": "2026-03-01T09:05:00Z",
             "fieldsType": "FieldsV1", "subresource": "status",
             "fieldsV1": {"f:status": {"f:conditions": {"k:{\"type\":\"Ready\"}": {".": {}, "f:lastHeartbeatTime": {}, "f:status": {}}}, "f:images": {}, "f:nodeInfo": {"f:bootID": {}}}}},
            {"manager": "kube-node", "operation": "Apply", "apiVersion": "v1", "time": "2026-03-01T09:00:00Z",
             "fieldsType": "FieldsV1",
             "fieldsV1": {"f:metadata": {"f:annotations": {"f:kube-node.io/node-class": {}}, "f:labels": {"f:pool": {}}}}},
            {"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1", "time": "2026-03-01T09:01:00Z",
             "fieldsType": "FieldsV1",
             "fieldsV1": {"f:metadata": {"f:annotations": {"f:node.alpha.kubernetes.io/ttl": {}}}, "f:spec": {"f:podCIDR": {}, "f:podCIDRs": {}}}},
        ],
    });
    if deleting {
        metadata["deletionTimestamp"] = serde_json::json!("2026-03-01T11:00:00Z");
        metadata["deletionGracePeriodSeconds"] = serde_json::json!(0);
    }
    let mut spec = serde_json::json!({
        "providerID": format!("aws:///eu-west-1{zone}/i-{i:017x}"),
        "podCIDR": format!("10.{}.{}.0/24", i / 256, i % 256),
        "podCIDRs": [format!("10.{}.{}.0/24", i / 256, i % 256)],
        "taints": taints,
    });
    if cordoned {
        spec["unschedulable"] = serde_json::json!(true);
    }
    let heartbeat = format!("2026-03-01T10:{:02}:{:02}Z", (i / 60) % 60, i % 60);
    let pressure = |t: &str, reason: &str, message: &str| {
        serde_json::json!({
            "type": t, "status": "False", "reason": reason, "message": message,
            "lastHeartbeatTime": heartbeat, "lastTransitionTime": "2026-03-01T09:05:00Z",
        })
    };
    let node = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": metadata,
        "spec": spec,
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": format!("10.1.{}.{}", i / 256, i % 256)},
                {"type": "InternalDNS", "address": format!("ip-10-1-{}-{}.eu-west-1.compute.internal", i / 256, i % 256)},
                {"type": "Hostname", "address": name},
            ],
            "allocatable": {"cpu": "3920m", "ephemeral-storage": "95551679124", "hugepages-1Gi": "0",
                            "hugepages-2Mi": "0", "memory": "15147144Ki", "pods": "58"},
            "capacity": {"cpu": "4", "ephemeral-storage": "104845292Ki", "hugepages-1Gi": "0",
                         "hugepages-2Mi": "0", "memory": "16064648Ki", "pods": "58"},
            "conditions": [
                pressure("MemoryPressure", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                pressure("DiskPressure", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                pressure("PIDPressure", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                {"type": "Ready", "status": "True", "reason": "KubeletReady",
                 "message": "kubelet is posting ready status",
                 "lastHeartbeatTime": heartbeat, "lastTransitionTime": "2026-03-01T09:05:00Z"},
                {"type": "MachineReady", "status": "True", "reason": "Ready",
                 "message": "the machine is running and its kubelet is Ready",
                 "lastHeartbeatTime": "2026-03-01T09:05:00Z", "lastTransitionTime": "2026-03-01T09:05:00Z"},
                {"type": "Drifted", "status": if i.is_multiple_of(4) { "True" } else { "False" },
                 "reason": if i.is_multiple_of(4) { "NodeClassChanged" } else { "UpToDate" },
                 "message": "built from what the NodeSet and its NodeClass say now",
                 "lastHeartbeatTime": "2026-03-01T09:30:00Z", "lastTransitionTime": "2026-03-01T09:30:00Z"},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "images": images,
            "nodeInfo": {
                "architecture": "amd64",
                "bootID": format!("{:08x}-0000-4000-8000-{:012x}", i * 17, i),
                "containerRuntimeVersion": "containerd://1.7.22",
                "kernelVersion": "6.1.112-124.190.amzn2023.x86_64",
                "kubeProxyVersion": "v1.33.1",
                "kubeletVersion": "v1.33.1",
                "machineID": format!("ec2{:029x}", i),
                "operatingSystem": "linux",
                "osImage": "Amazon Linux 2023.6.20241010",
                "systemUUID": format!("ec2{:05x}-0000-0000-0000-{:012x}", i, i),
            },
        },
    });
    serde_json::from_value(node).expect("a valid Node")
}

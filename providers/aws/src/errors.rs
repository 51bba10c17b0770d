//! EC2 error codes → [`ProviderError`]: the error table of issue 4 as a pure function, plus the
//! glue from the SDK's error type.

use std::error::Error as StdError;

use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use kube_node_provider::ProviderError;

/// Where an EC2 error points in the NodeClass, so an InvalidConfig names the field to fix.
fn field_for(code: &str, message: &str) -> &'static str {
    let lower = message.to_ascii_lowercase();
    if code.starts_with("InvalidAMIID") {
        "spec.provider.aws.ami"
    } else if code.starts_with("InvalidSubnet") {
        "spec.provider.aws.subnetIds"
    } else if code.starts_with("InvalidGroup") || code.starts_with("InvalidSecurityGroup") {
        "spec.provider.aws.securityGroupIds"
    } else if code.starts_with("InvalidKeyPair") {
        "spec.provider.aws.keyName"
    } else if code.starts_with("InvalidUserData") {
        "spec.bootstrap"
    } else if code == "InvalidInstanceType"
        || lower.contains("instance type")
        || lower.contains("instancetype")
    {
        "spec.provider.aws.instanceType"
    } else if lower.contains("iaminstanceprofile") || lower.contains("instance profile") {
        "spec.provider.aws.iamInstanceProfile"
    } else if code.starts_with("InvalidBlockDeviceMapping")
        || code.starts_with("InvalidVolume")
        || lower.contains("blockdevicemapping")
    {
        "spec.provider.aws.rootVolume"
    } else if lower.contains("spot") {
        "spec.provider.aws.capacityType"
    } else {
        "spec.provider.aws"
    }
}

/// Capacity codes: another instance type or subnet (zone) may succeed.
const CAPACITY: &[&str] = &[
    "InsufficientInstanceCapacity",
    "InsufficientHostCapacity",
    "InsufficientReservedInstanceCapacity",
    "InsufficientCapacity",
    "InsufficientCapacityOnHost",
    "InsufficientFreeAddressesInSubnet",
    "SpotMaxPriceTooLow",
];

const QUOTA: &[&str] = &[
    "InstanceLimitExceeded",
    "VcpuLimitExceeded",
    "MaxSpotInstanceCountExceeded",
    "ResourceLimitExceeded",
    "VolumeLimitExceeded",
    "MaxIOPSLimitExceeded",
];

const THROTTLED: &[&str] = &[
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "SlowDown",
    "PriorRequestNotComplete",
    "BandwidthLimitExceeded",
];

const UNAUTHORIZED: &[&str] = &[
    "AuthFailure",
    "UnauthorizedOperation",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "IncompleteSignature",
    "MissingAuthenticationToken",
    "ExpiredToken",
    "OptInRequired",
    "Blocked",
    "AccessDenied",
    "AccessDeniedException",
];

const TRANSIENT: &[&str] = &[
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "Unavailable",
    "RequestTimeout",
    "RequestTimeoutException",
    "RequestExpired",
    // The same ClientToken with other parameters within EC2's idempotency window: the token
    // rotates (see `plan::client_token`), so a later attempt goes through.
    "IdempotentParameterMismatch",
];

/// Maps an EC2 error code (and its message) to the provider error of the contract.
///
/// Pure, so the table is unit-tested without an emulator. Unknown codes are Transient: the
/// controllers back off exponentially, so an unknown error slows down instead of storming.
pub fn classify(code: &str, message: &str) -> ProviderError {
    let text = if message.is_empty() {
        code.to_string()
    } else {
        format!("{code}: {message}")
    };
    if CAPACITY.contains(&code) {
        return ProviderError::InsufficientCapacity(text);
    }
    if QUOTA.contains(&code) {
        return ProviderError::QuotaExceeded(text);
    }
    if THROTTLED.contains(&code) {
        return ProviderError::Throttled {
            message: text,
            retry_after: None,
        };
    }
    if UNAUTHORIZED.contains(&code) {
        return ProviderError::Unauthorized(text);
    }
    if code.starts_with("InvalidInstanceID") {
        return ProviderError::NotFound(text);
    }
    if TRANSIENT.contains(&code) {
        return ProviderError::Transient(text);
    }
    let invalid = code.starts_with("InvalidParameter")
        || code.starts_with("InvalidAMIID")
        || code.starts_with("InvalidSubnet")
        || code.starts_with("InvalidGroup")
        || code.starts_with("InvalidSecurityGroup")
        || code.starts_with("InvalidKeyPair")
        || code.starts_with("InvalidUserData")
        || code.starts_with("InvalidBlockDeviceMapping")
        || code.starts_with("InvalidVolume")
        || code == "InvalidInstanceType"
        || code == "MissingParameter"
        || code == "UnknownParameter"
        || code == "InvalidParameterCombination"
        || code == "Unsupported"
        || code == "UnsupportedOperation"
        || code == "InvalidIPAddress.InUse"
        || code == "InvalidAddressID.NotFound";
    if invalid {
        return ProviderError::InvalidConfig(format!("{}: {text}", field_for(code, message)));
    }
    ProviderError::Transient(text)
}

/// Codes after which `create` tries the next instance type or subnet instead of failing:
/// capacity, and `Unsupported` (the instance type is not offered in that zone).
pub fn try_next_candidate(code: &str) -> bool {
    CAPACITY.contains(&code) || code == "Unsupported"
}

/// The error code of an SDK error, when the service sent one.
pub(crate) fn code_of<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> Option<&str> {
    match err {
        SdkError::ServiceError(_) => err.code(),
        _ => None,
    }
}

/// Converts an SDK error. Service errors go through [`classify`]; transport errors are
/// Transient, except a failure to find credentials, which is Unauthorized. Messages carry only
/// the code, EC2's message and the error chain's text: never a credential (the SDK's errors do
/// not echo the signing key, and we never format the request).
pub(crate) fn from_sdk<E, R>(operation: &str, err: SdkError<E, R>) -> ProviderError
where
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    if let SdkError::ServiceError(_) = &err {
        let code = err.code().unwrap_or("Unknown").to_string();
        let message = err.message().unwrap_or_default().to_string();
        return classify(&code, &format!("{operation}: {message}"));
    }
    let mut chain = String::new();
    let mut credentials = false;
    let mut source: Option<&(dyn StdError + 'static)> = Some(&err);
    while let Some(e) = source {
        if e.downcast_ref::<aws_credential_types::provider::error::CredentialsError>()
            .is_some()
        {
            credentials = true;
        }
        if !chain.is_empty() {
            chain.push_str(": ");
        }
        chain.push_str(&e.to_string());
        source = e.source();
    }
    let text = format!("{operation}: {chain}");
    if credentials
        || chain.contains("failed to load credentials")
        || chain.contains("no credentials")
    {
        ProviderError::Unauthorized(text)
    } else {
        ProviderError::Transient(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_codes_are_insufficient_capacity_and_move_on() {
        for code in [
            "InsufficientInstanceCapacity",
            "InsufficientFreeAddressesInSubnet",
        ] {
            let e = classify(code, "no capacity");
            assert_eq!(e.reason(), "InsufficientCapacity", "{code}");
            assert!(e.is_retryable() && e.is_out_of_resources(), "{code}");
            assert!(try_next_candidate(code), "{code}");
        }
        assert!(try_next_candidate("Unsupported"));
        assert!(!try_next_candidate("InvalidAMIID.NotFound"));
        assert!(!try_next_candidate("VcpuLimitExceeded"));
    }

    #[test]
    fn limits_are_quota_exceeded() {
        for code in [
            "InstanceLimitExceeded",
            "VcpuLimitExceeded",
            "MaxSpotInstanceCountExceeded",
        ] {
            let e = classify(code, "limit");
            assert_eq!(e.reason(), "QuotaExceeded", "{code}");
            assert!(e.is_retryable(), "{code}");
        }
    }

    #[test]
    fn throttling_is_throttled() {
        for code in ["RequestLimitExceeded", "Throttling", "ThrottlingException"] {
            assert_eq!(classify(code, "slow down").reason(), "Throttled", "{code}");
        }
    }

    #[test]
    fn invalid_codes_are_invalid_config_naming_the_field() {
        let cases = [
            ("InvalidAMIID.NotFound", "", "spec.provider.aws.ami"),
            ("InvalidAMIID.Malformed", "", "spec.provider.aws.ami"),
            (
                "InvalidSubnetID.NotFound",
                "",
                "spec.provider.aws.subnetIds",
            ),
            (
                "InvalidGroup.NotFound",
                "",
                "spec.provider.aws.securityGroupIds",
            ),
            ("InvalidKeyPair.NotFound", "", "spec.provider.aws.keyName"),
            (
                "InvalidParameterValue",
                "Invalid IAM Instance Profile name",
                "spec.provider.aws.iamInstanceProfile",
            ),
            (
                "InvalidParameterValue",
                "Invalid value 'x1.huge' for InstanceType",
                "spec.provider.aws.instanceType",
            ),
            (
                "InvalidParameterCombination",
                "whatever",
                "spec.provider.aws",
            ),
        ];
        for (code, message, field) in cases {
            let e = classify(code, message);
            assert_eq!(e.reason(), "InvalidConfig", "{code}");
            assert!(!e.is_retryable(), "{code}");
            assert!(
                e.message().starts_with(field),
                "{code}: {:?} should name {field}",
                e.message()
            );
        }
    }

    #[test]
    fn auth_codes_are_unauthorized() {
        for code in [
            "AuthFailure",
            "UnauthorizedOperation",
            "InvalidClientTokenId",
        ] {
            let e = classify(code, "denied");
            assert_eq!(e.reason(), "Unauthorized", "{code}");
            assert!(!e.is_retryable());
        }
    }

    #[test]
    fn missing_instances_are_not_found() {
        for code in ["InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"] {
            assert_eq!(classify(code, "").reason(), "NotFound", "{code}");
        }
    }

    #[test]
    fn server_and_unknown_codes_are_transient() {
        for code in ["InternalError", "Unavailable", "SomethingNew"] {
            let e = classify(code, "");
            assert_eq!(e.reason(), "Transient", "{code}");
            assert!(e.is_retryable());
        }
    }

    #[test]
    fn message_keeps_code_and_text() {
        let e = classify("InsufficientInstanceCapacity", "We currently do not have");
        assert_eq!(
            e.message(),
            "InsufficientInstanceCapacity: We currently do not have"
        );
    }
}

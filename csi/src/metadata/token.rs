//! Service-account tokens for the SnapshotMetadata service.
//!
//! Every call carries, in `security_token`, a token whose audience is the one the driver's
//! [`SnapshotMetadataService`](super::SnapshotMetadataService) names; the service reviews it and
//! checks that the account may read the snapshots (KEP-3314, "Risks and Mitigations"). The token
//! comes from the TokenRequest API (`POST .../serviceaccounts/NAME/token`), for the account the
//! caller names or, by default, the account the client itself runs as (found with a
//! SelfSubjectReview).

use std::fmt;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{SelfSubjectReview, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::PostParams;
use kube::{Api, Client};

use crate::error::{Error, Result};

/// Prefix of a service account's user name, `system:serviceaccount:NAMESPACE:NAME`.
const SERVICE_ACCOUNT_USER: &str = "system:serviceaccount:";

/// A service account, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccountRef {
    /// Namespace of the account.
    pub namespace: String,
    /// Name of the account.
    pub name: String,
}

impl ServiceAccountRef {
    /// Parses `NAMESPACE/NAME` or the user name `system:serviceaccount:NAMESPACE:NAME`.
    pub fn parse(text: &str) -> Result<Self> {
        let pair = match text.strip_prefix(SERVICE_ACCOUNT_USER) {
            Some(rest) => rest.split_once(':'),
            None => text.split_once('/'),
        };
        match pair {
            Some((namespace, name))
                if !namespace.is_empty() && !name.is_empty() && !name.contains([':', '/']) =>
            {
                Ok(ServiceAccountRef {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(Error::Invalid {
                what: "service account",
                reason: format!("{text:?} is not NAMESPACE/NAME"),
            }),
        }
    }
}

impl fmt::Display for ServiceAccountRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A bearer token; `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecurityToken(String);

impl SecurityToken {
    /// Wraps a token obtained elsewhere.
    pub fn new(token: impl Into<String>) -> Self {
        SecurityToken(token.into())
    }

    /// The token itself, for the request.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecurityToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecurityToken(..)")
    }
}

/// The service account the client is authenticated as.
pub async fn current_service_account(client: &Client) -> Result<ServiceAccountRef> {
    let review = Api::<SelfSubjectReview>::all(client.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .map_err(Error::kube("create SelfSubjectReview"))?;
    let user = review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .unwrap_or_default();
    if !user.starts_with(SERVICE_ACCOUNT_USER) {
        return Err(Error::Invalid {
            what: "service account",
            reason: format!(
                "the client runs as {user:?}, not a service account; name one explicitly"
            ),
        });
    }
    ServiceAccountRef::parse(&user)
}

/// A token of `account` for `audience`, valid for `expiry` (the API server may shorten it; the
/// minimum it accepts is ten minutes).
pub async fn request_token(
    client: &Client,
    account: &ServiceAccountRef,
    audience: &str,
    expiry: Duration,
) -> Result<SecurityToken> {
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.to_owned()],
            expiration_seconds: Some(i64::try_from(expiry.as_secs()).unwrap_or(i64::MAX)),
            ..Default::default()
        },
        ..Default::default()
    };
    let operation =
        format!("request a token of service account {account} for audience {audience:?}");
    let response: TokenRequest =
        Api::<ServiceAccount>::namespaced(client.clone(), &account.namespace)
            .create_subresource("token", &account.name, &PostParams::default(), &request)
            .await
            .map_err(Error::kube(operation))?;
    match response.status {
        Some(status) if !status.token.is_empty() => Ok(SecurityToken(status.token)),
        _ => Err(Error::MissingField {
            kind: "TokenRequest",
            name: account.to_string(),
            what: "status.token",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_parse_from_both_spellings() {
        let expected = ServiceAccountRef {
            namespace: "backup".into(),
            name: "strata".into(),
        };
        assert_eq!(ServiceAccountRef::parse("backup/strata").unwrap(), expected);
        assert_eq!(
            ServiceAccountRef::parse("system:serviceaccount:backup:strata").unwrap(),
            expected
        );
        for bad in [
            "strata",
            "/strata",
            "backup/",
            "a/b/c",
            "system:serviceaccount:x",
        ] {
            assert!(
                matches!(
                    ServiceAccountRef::parse(bad),
                    Err(Error::Invalid {
                        what: "service account",
                        ..
                    })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn tokens_stay_out_of_debug_output() {
        assert_eq!(
            format!("{:?}", SecurityToken::new("secret")),
            "SecurityToken(..)"
        );
    }
}

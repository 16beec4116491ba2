//! Failures as the API server reports them: a `Status` object with the
//! HTTP code, reason and message the real server uses for each case.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    ListMeta, Status, StatusCause, StatusDetails,
};

use super::kinds::Kind;

#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub code: u16,
    pub status: Box<Status>,
}

impl Failure {
    fn new(code: u16, reason: &str, message: String, details: Option<StatusDetails>) -> Failure {
        Failure {
            code,
            status: Box::new(Status {
                status: Some("Failure".into()),
                code: Some(i32::from(code)),
                reason: Some(reason.into()),
                message: Some(message),
                details,
                metadata: ListMeta::default(),
            }),
        }
    }

    /// A path nothing is served at.
    pub fn no_such_path() -> Failure {
        Failure::new(
            404,
            "NotFound",
            "the server could not find the requested resource".into(),
            Some(StatusDetails::default()),
        )
    }

    /// `services "web" not found`.
    pub fn not_found(kind: &Kind, name: &str) -> Failure {
        Failure::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", kind.qualified()),
            Some(StatusDetails {
                name: Some(name.into()),
                group: (!kind.group.is_empty()).then(|| kind.group.into()),
                kind: Some(kind.plural.into()),
                ..StatusDetails::default()
            }),
        )
    }

    pub fn method_not_allowed() -> Failure {
        Failure::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource".into(),
            Some(StatusDetails::default()),
        )
    }

    pub fn bad_request(message: String) -> Failure {
        Failure::new(400, "BadRequest", message, None)
    }

    /// Invalid list or watch options, as `ValidateListOptions` reports them.
    pub fn invalid_options(field: &str, message: &str) -> Failure {
        Failure::new(
            422,
            "Invalid",
            format!("ListOptions.meta.k8s.io \"\" is invalid: {field}: Forbidden: {message}"),
            Some(StatusDetails {
                group: Some("meta.k8s.io".into()),
                kind: Some("ListOptions".into()),
                causes: Some(vec![StatusCause {
                    reason: Some("FieldValueForbidden".into()),
                    message: Some(format!("Forbidden: {message}")),
                    field: Some(field.into()),
                }]),
                ..StatusDetails::default()
            }),
        )
    }

    /// 410 Gone, reason Expired.
    pub fn expired(message: String) -> Failure {
        Failure::new(410, "Expired", message, None)
    }

    /// A continue token whose snapshot was compacted away: the real server
    /// hands back a token that continues at the latest version instead.
    pub fn continue_expired(fresh_token: String) -> Failure {
        let mut failure = Failure::expired(
            "The provided continue parameter is too old to display a consistent list result. \
             You can start a new list without the continue parameter, or use the continue \
             token in this response to retrieve the remainder of the results. Continuing \
             with the provided token results in an inconsistent list - objects that were \
             created, modified, or deleted between the time the first chunk was returned and \
             now may show up in the list."
                .into(),
        );
        failure.status.metadata.continue_ = Some(fresh_token);
        failure
    }

    /// A resourceVersion the server has not reached.
    pub fn too_large(asked: u64, current: u64) -> Failure {
        Failure::new(
            504,
            "Timeout",
            format!("Timeout: Too large resource version: {asked}, current: {current}"),
            Some(StatusDetails {
                causes: Some(vec![StatusCause {
                    reason: Some("ResourceVersionTooLarge".into()),
                    message: Some("Too large resource version".into()),
                    field: None,
                }]),
                retry_after_seconds: Some(1),
                ..StatusDetails::default()
            }),
        )
    }

    pub fn json(&self) -> String {
        serde_json::to_string(&self.status).unwrap_or_default()
    }
}

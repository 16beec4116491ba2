//! `meshctl debug-log [on|off]`: the kernel-side debug log switch.

use std::path::Path;

use super::redirect::Switch;
use super::table::Table;
use crate::admin::{self, AdminClientError, DebugLogResponse, SetDebugLogRequest};

/// Shows the switch, after flipping it when asked.
pub async fn execute(
    socket: &Path,
    switch: Option<Switch>,
) -> Result<DebugLogResponse, AdminClientError> {
    match switch {
        None => admin::get(socket, admin::PATH_DEBUG_LOG).await,
        Some(s) => {
            let body = SetDebugLogRequest {
                enabled: s == Switch::On,
            };
            admin::post(socket, admin::PATH_DEBUG_LOG, &body).await
        }
    }
}

pub fn render(r: &DebugLogResponse) -> String {
    let mut t = Table::new(["FIELD", "VALUE"]);
    t.row(["kernel debug log", if r.enabled { "on" } else { "off" }]);
    t.render()
}

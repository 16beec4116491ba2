//! Connections and routing: the API's real paths, each to its handler.

use std::io;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::Shared;
use super::http::{self, Request};
use super::kinds::{self, KINDS};
use super::list::{self, Selection};
use super::query::Query;
use super::status::Failure;
use super::watch::{self, Ended};

/// What a path names.
#[derive(Debug, PartialEq)]
enum Route<'a> {
    Version,
    /// `/api`
    CoreVersions,
    /// `/apis`
    Groups,
    /// `/apis/{group}`
    Group(&'a str),
    /// `/api/v1`, `/apis/{group}/{version}`
    Resources {
        group: &'a str,
        version: &'a str,
    },
    /// A kind's objects, in one namespace or all.
    Collection {
        kind: usize,
        namespace: Option<&'a str>,
    },
    /// One object.
    Object {
        kind: usize,
        namespace: Option<&'a str>,
        name: &'a str,
    },
    Unknown,
}

fn route(path: &str) -> Route<'_> {
    let path = path.trim_end_matches('/');
    let parts: Vec<&str> = path.split('/').skip(1).collect();
    let (group, version, rest) = match parts.as_slice() {
        ["version"] => return Route::Version,
        ["api"] => return Route::CoreVersions,
        ["apis"] => return Route::Groups,
        ["apis", group] => return Route::Group(group),
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Route::Unknown,
    };
    let in_kind = |plural: &str| kinds::by_path(group, version, plural);
    let namespaced = |kind: usize| KINDS[kind].namespaced;
    match rest {
        [] => Route::Resources { group, version },
        [plural] => match in_kind(plural) {
            Some(kind) => Route::Collection {
                kind,
                namespace: None,
            },
            None => Route::Unknown,
        },
        ["namespaces", ns, plural] => match in_kind(plural) {
            Some(kind) if namespaced(kind) => Route::Collection {
                kind,
                namespace: Some(ns),
            },
            _ => Route::Unknown,
        },
        [plural, name] => match in_kind(plural) {
            Some(kind) if !namespaced(kind) => Route::Object {
                kind,
                namespace: None,
                name,
            },
            _ => Route::Unknown,
        },
        ["namespaces", ns, plural, name] => match in_kind(plural) {
            Some(kind) if namespaced(kind) => Route::Object {
                kind,
                namespace: Some(ns),
                name,
            },
            _ => Route::Unknown,
        },
        _ => Route::Unknown,
    }
}

/// Serves one connection: requests one after another (keep-alive) until
/// the client closes it, asks to, or a watch on it is dropped.
pub(crate) async fn connection(stream: TcpStream, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = stream.into_split();
    let mut buf = Vec::new();
    loop {
        let request = match http::read_request(&mut reader, &mut buf).await {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(_) => {
                let failure = Failure::bad_request("malformed HTTP request".into());
                let _ = http::respond(&mut writer, 400, &failure.json()).await;
                return;
            }
        };
        shared.log(format!("{} {}", request.method, request.target));
        match answer(&shared, &request, &mut reader, &mut writer).await {
            Ok(Ended::Cleanly) if !request.close => {}
            _ => {
                let _ = writer.shutdown().await;
                return;
            }
        }
    }
}

async fn answer(
    shared: &Shared,
    request: &Request,
    reader: &mut tokio::net::tcp::OwnedReadHalf,
    writer: &mut tokio::net::tcp::OwnedWriteHalf,
) -> io::Result<Ended> {
    let route = route(request.path());
    if route == Route::Unknown {
        return fail(writer, &Failure::no_such_path()).await;
    }
    if request.method != "GET" {
        return fail(writer, &Failure::method_not_allowed()).await;
    }
    let query = Query::parse(request.query());
    let body = match route {
        Route::Version => json(&kinds::version()),
        Route::CoreVersions => json(&kinds::core_versions(&shared.address)),
        Route::Groups => json(&kinds::group_list()),
        Route::Group(name) => match kinds::group(name) {
            Some(group) => json(&group),
            None => return fail(writer, &Failure::no_such_path()).await,
        },
        Route::Resources { group, version } => match kinds::resource_list(group, version) {
            Some(list) => json(&list),
            None => return fail(writer, &Failure::no_such_path()).await,
        },
        Route::Collection { kind, namespace } => {
            let selection = match Selection::from_query(kind, namespace, &query) {
                Ok(selection) => selection,
                Err(failure) => return fail(writer, &failure).await,
            };
            if query.flag("watch") {
                return watch::serve(shared, kind, selection, &query, reader, writer).await;
            }
            let listed = list::list(&shared.store(), kind, &selection, &query);
            match listed {
                Ok(body) => body,
                Err(failure) => return fail(writer, &failure).await,
            }
        }
        Route::Object {
            kind,
            namespace,
            name,
        } => {
            let key = (namespace.unwrap_or_default().to_owned(), name.to_owned());
            let found = shared.store().get(kind, &key).map(|o| o.json.clone());
            match found {
                Some(body) => body,
                None => return fail(writer, &Failure::not_found(&KINDS[kind], name)).await,
            }
        }
        Route::Unknown => return fail(writer, &Failure::no_such_path()).await,
    };
    http::respond(writer, 200, &body).await?;
    Ok(Ended::Cleanly)
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

async fn fail<W: tokio::io::AsyncWrite + Unpin>(
    writer: &mut W,
    failure: &Failure,
) -> io::Result<Ended> {
    http::respond(writer, failure.code, &failure.json()).await?;
    Ok(Ended::Cleanly)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_real_paths() {
        let services = kinds::by_path("", "v1", "services").unwrap();
        let slices = kinds::by_path("discovery.k8s.io", "v1", "endpointslices").unwrap();
        let nodes = kinds::by_path("", "v1", "nodes").unwrap();
        assert_eq!(route("/version"), Route::Version);
        assert_eq!(route("/api"), Route::CoreVersions);
        assert_eq!(route("/apis/"), Route::Groups);
        assert_eq!(
            route("/api/v1"),
            Route::Resources {
                group: "",
                version: "v1"
            }
        );
        assert_eq!(
            route("/api/v1/services"),
            Route::Collection {
                kind: services,
                namespace: None
            }
        );
        assert_eq!(
            route("/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices"),
            Route::Collection {
                kind: slices,
                namespace: Some("ns")
            }
        );
        assert_eq!(
            route("/api/v1/namespaces/ns/services/web"),
            Route::Object {
                kind: services,
                namespace: Some("ns"),
                name: "web"
            }
        );
        assert_eq!(
            route("/api/v1/nodes/node-a"),
            Route::Object {
                kind: nodes,
                namespace: None,
                name: "node-a"
            }
        );
        // Namespaced kinds have no cluster-wide object path; nodes no namespace.
        assert_eq!(route("/api/v1/services/web"), Route::Unknown);
        assert_eq!(route("/api/v1/namespaces/ns/nodes"), Route::Unknown);
        assert_eq!(route("/api/v1/configmaps"), Route::Unknown);
        assert_eq!(route("/apis/apps/v1/deployments"), Route::Unknown);
        assert_eq!(route("/healthz"), Route::Unknown);
    }
}

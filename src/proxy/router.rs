//! Picks a route by listener, host and path prefix; longest prefix wins, then file order.

use crate::service::RouteService;

pub struct Route {
    pub name: String,
    prefix: String,
    host: Option<String>,
    /// Index into the config's listeners; `None` matches every listener.
    listener: Option<usize>,
    pub service: RouteService,
}

impl Route {
    pub fn new(
        name: String,
        prefix: String,
        host: Option<String>,
        listener: Option<usize>,
        service: RouteService,
    ) -> Self {
        Route {
            name,
            prefix,
            host: host.map(|h| h.to_ascii_lowercase()),
            listener,
            service,
        }
    }

    fn matches(&self, listener: usize, host: Option<&str>, path: &str) -> bool {
        if self.listener.is_some_and(|l| l != listener) {
            return false;
        }
        if let Some(want) = &self.host {
            let Some(host) = host else { return false };
            let ok = match want.strip_prefix("*.") {
                Some(suffix) => host
                    .strip_suffix(suffix)
                    .is_some_and(|head| head.ends_with('.') && head.len() > 1),
                None => host == want,
            };
            if !ok {
                return false;
            }
        }
        prefix_matches(&self.prefix, path)
    }
}

/// Whole-segment prefix match: `/openai` matches `/openai` and `/openai/x`, not `/openaix`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

pub struct Router {
    routes: Vec<Route>,
    /// Whether any route matches on the host; if none does, requests skip looking it up.
    matches_hosts: bool,
    /// The stack that answers requests no route matches (404, still observed).
    pub unmatched: RouteService,
}

impl Router {
    pub fn new(mut routes: Vec<Route>, unmatched: RouteService) -> Self {
        // Stable sort: among equal prefixes the file order decides.
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len() + usize::from(r.host.is_some())));
        let matches_hosts = routes.iter().any(|r| r.host.is_some());
        Router {
            routes,
            matches_hosts,
            unmatched,
        }
    }

    pub fn matches_hosts(&self) -> bool {
        self.matches_hosts
    }

    /// `host` may carry a port; it is compared without it, case-insensitively.
    pub fn find(&self, listener: usize, host: Option<&str>, path: &str) -> Option<&Route> {
        let host = host.map(|h| {
            let h = h
                .rsplit_once(':')
                .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
                .map_or(h, |(name, _)| name);
            h.to_ascii_lowercase()
        });
        self.routes
            .iter()
            .find(|r| r.matches(listener, host.as_deref(), path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ProxyError;

    fn svc() -> RouteService {
        RouteService::new(tower::service_fn(
            |_req: crate::service::ProxyRequest| -> crate::service::ProxyFuture {
                Box::pin(async {
                    Err::<crate::service::ProxyResponse, _>(ProxyError::Internal("test".into()))
                })
            },
        ))
    }

    fn route(name: &str, prefix: &str, host: Option<&str>, listener: Option<usize>) -> Route {
        Route::new(
            name.into(),
            prefix.into(),
            host.map(Into::into),
            listener,
            svc(),
        )
    }

    #[test]
    fn matching() {
        let router = Router::new(
            vec![
                route("root", "/", None, None),
                route("openai", "/openai", None, None),
                route("openai-v2", "/openai/v2", None, None),
                route("db", "/db/", Some("db.local"), None),
                route("wild", "/w", Some("*.example.com"), None),
                route("second", "/only-second", None, Some(1)),
            ],
            svc(),
        );
        let name = |l, h, p| {
            router
                .find(l, h, p)
                .map(|r| r.name.clone())
                .unwrap_or_default()
        };
        assert_eq!(name(0, None, "/openai/v1/chat"), "openai");
        assert_eq!(name(0, None, "/openai"), "openai");
        assert_eq!(name(0, None, "/openaix"), "root");
        assert_eq!(name(0, None, "/openai/v2/x"), "openai-v2");
        assert_eq!(name(0, Some("DB.local:8080"), "/db/x"), "db");
        assert_eq!(name(0, Some("other"), "/db/x"), "root");
        assert_eq!(name(0, Some("a.example.com"), "/w"), "wild");
        assert_eq!(name(0, Some("example.com"), "/w"), "root");
        assert_eq!(name(1, None, "/only-second"), "second");
        assert_eq!(name(0, None, "/only-second"), "root");
        let no_root = Router::new(vec![route("a", "/a", None, None)], svc());
        assert!(no_root.find(0, None, "/b").is_none());
    }
}

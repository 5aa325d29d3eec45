//! HTTP methods as config values: any method (`retries.methods`, `cache.methods`), or one that
//! only reads (`dedup.methods`, cache rules). Case-insensitive: `get` is `GET`.

use http::Method;
use serde::{Deserialize, Serialize};

/// Any HTTP method.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct HttpMethod(pub Method);

impl HttpMethod {
    pub fn of(method: Method) -> HttpMethod {
        HttpMethod(method)
    }
}

impl TryFrom<String> for HttpMethod {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        Method::from_bytes(text.to_ascii_uppercase().as_bytes())
            .map(HttpMethod)
            .map_err(|_| format!("{text:?} is not an HTTP method"))
    }
}

impl From<HttpMethod> for String {
    fn from(method: HttpMethod) -> String {
        method.0.to_string()
    }
}

/// A method that only reads: anything but PUT, PATCH, DELETE and CONNECT.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct ReadMethod(pub Method);

impl TryFrom<String> for ReadMethod {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        let HttpMethod(method) = HttpMethod::try_from(text)?;
        let writes = [Method::PUT, Method::DELETE, Method::PATCH, Method::CONNECT];
        if writes.contains(&method) {
            return Err(format!(
                "{method} changes state or opens a tunnel, and is never cached or coalesced"
            ));
        }
        Ok(ReadMethod(method))
    }
}

impl From<ReadMethod> for String {
    fn from(method: ReadMethod) -> String {
        method.0.to_string()
    }
}

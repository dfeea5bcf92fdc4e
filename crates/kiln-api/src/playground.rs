//! The playground: a page at `/` where a person picks a model, fills in its inputs and watches
//! the image arrive. It is a client of the public API like any other (same origin, the user's
//! own API key), so it has no endpoint of its own beyond its three static files.
//!
//! The files are compiled into the binary (no Node, no build step to build or run kiln) and
//! served with a strict Content-Security-Policy: scripts and styles only from these files (no
//! inline code, so injected markup could not run), images from this origin and from `blob:`
//! (downloads and uploaded references), requests only to this origin, no frames, no plugins.

use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

const INDEX_HTML: &str = include_str!("../assets/playground/index.html");
const APP_JS: &str = include_str!("../assets/playground/app.js");
const APP_CSS: &str = include_str!("../assets/playground/app.css");
const ICON_SVG: &str = include_str!("../assets/playground/icon.svg");

/// Where the page's own files are served; `index.html` names them.
pub(crate) const SCRIPT_PATH: &str = "/playground/app.js";
pub(crate) const STYLE_PATH: &str = "/playground/app.css";
pub(crate) const ICON_PATH: &str = "/playground/icon.svg";

/// Nothing runs or loads unless it is one of the files above or this origin's API.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; form-action 'none'; \
     frame-ancestors 'none'; base-uri 'none'";

/// `GET /`: the page.
pub(crate) async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

/// `GET /playground/app.js`.
pub(crate) async fn script() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

/// `GET /playground/app.css`.
pub(crate) async fn style() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

/// `GET /playground/icon.svg`: the tab's icon (without one, browsers ask for `/favicon.ico`).
pub(crate) async fn icon() -> Response {
    asset("image/svg+xml", ICON_SVG)
}

/// A static file with the playground's security headers. `no-cache`: a browser revalidates, so
/// an upgraded kiln never runs last version's script against this version's API.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    let headers = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (
            HeaderName::from_static("cross-origin-opener-policy"),
            HeaderValue::from_static("same-origin"),
        ),
    ];
    (StatusCode::OK, headers, body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_names_its_own_files_and_no_inline_code() {
        for path in [SCRIPT_PATH, STYLE_PATH, ICON_PATH] {
            assert!(INDEX_HTML.contains(path), "index.html links {path}");
        }
        // The policy refuses inline code; the page must not depend on any.
        assert!(!INDEX_HTML.contains("<style"));
        assert!(!INDEX_HTML.contains(" style="));
        assert!(!INDEX_HTML.contains(" onclick="));
        let scripts = INDEX_HTML.matches("<script").count();
        let external = INDEX_HTML.matches("<script type=\"module\" src=").count();
        assert_eq!(scripts, external, "every script is an external file");
    }
}

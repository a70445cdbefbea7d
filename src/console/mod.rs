//! The operator console: a small web page served by verigate itself, every asset embedded
//! in the binary (no CDN, works without internet). It reads and acts only through the
//! `/v1` API with the token the operator signs in with, so it can do nothing the API
//! would not let that token do.
//!
//! The page renders every value from the API as text, never as HTML, and the
//! Content-Security-Policy makes that a rule the browser enforces: scripts and styles
//! only from these files, connections only to this origin, and `innerHTML`-style
//! string-to-markup sinks refused outright (Trusted Types with no policy).

use actix_web::{
    http::header::{self, HeaderValue},
    web, HttpRequest, HttpResponse,
};

use crate::error::{ApiError, ErrorCode};

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const ASSETS: &[Asset] = &[
    Asset {
        name: "index.html",
        content_type: "text/html; charset=utf-8",
        body: include_str!("assets/index.html"),
    },
    Asset {
        name: "console.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("assets/console.js"),
    },
    Asset {
        name: "console.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("assets/console.css"),
    },
];

/// What the console's pages may do. No inline script or style, no eval, no plug-ins, no
/// framing, no form posts, and no assignment of strings to HTML sinks.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'; require-trusted-types-for 'script'; \
     trusted-types 'none'";

/// `GET /console`: the page.
pub async fn page(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    serve(&req, "index.html")
}

/// `GET /console/{file}`: its script and style sheet.
pub async fn asset(req: HttpRequest, file: web::Path<String>) -> Result<HttpResponse, ApiError> {
    serve(&req, &file)
}

/// The file's answer (304 when the browser has it), or 404 for a name not embedded.
fn serve(req: &HttpRequest, name: &str) -> Result<HttpResponse, ApiError> {
    let asset = ASSETS.iter().find(|a| a.name == name).ok_or_else(|| {
        ApiError::new(
            ErrorCode::NotFound,
            format!("the console has no file `{name}`"),
        )
    })?;
    let etag = format!("\"{:08x}\"", crc32fast::hash(asset.body.as_bytes()));
    let fresh = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes());
    let mut answer = if fresh {
        HttpResponse::NotModified()
    } else {
        HttpResponse::Ok()
    };
    answer
        .insert_header((header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::X_FRAME_OPTIONS, "DENY"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        // Revalidated on every load, so an upgraded binary's console is used at once.
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header((header::ETAG, etag));
    if fresh {
        return Ok(answer.finish());
    }
    Ok(answer
        .insert_header((
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        ))
        .body(asset.body))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The page must not reach outside this origin, nor inline what the policy forbids.
    #[test]
    fn embedded_assets_name_no_other_origin_and_inline_nothing() {
        for asset in ASSETS {
            // The SVG namespace is a name, not an address the browser fetches.
            let body = asset.body.replace("http://www.w3.org/2000/svg", "");
            for forbidden in [
                "http://",
                "https://",
                "innerHTML",
                "outerHTML",
                "insertAdjacentHTML",
                "document.write",
                "eval(",
                "new Function",
            ] {
                assert!(
                    !body.contains(forbidden),
                    "{} contains {forbidden}",
                    asset.name
                );
            }
        }
        let html = ASSETS[0].body;
        assert!(!html.contains("<script>") && !html.contains("<style"));
        assert!(!html.contains(" style=") && !html.contains(" onclick="));
    }

    #[test]
    fn the_policy_allows_no_inline_script_and_no_html_sinks() {
        assert!(!CONTENT_SECURITY_POLICY.contains("unsafe"));
        assert!(CONTENT_SECURITY_POLICY.contains("require-trusted-types-for 'script'"));
        assert!(CONTENT_SECURITY_POLICY.contains("default-src 'none'"));
    }
}

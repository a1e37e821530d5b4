//! The page for people: plain HTML, CSS and one script, compiled into the binary. The page
//! speaks only the JSON API; these handlers serve the three files and nothing else.

use super::api::{ApiError, Incoming, Reply};
use crate::app::App;
use crate::store::Store;

pub const INDEX_HTML: &str = include_str!("page/index.html");
pub const PAGE_CSS: &str = include_str!("page/page.css");
pub const PAGE_JS: &str = include_str!("page/page.js");

pub fn index(_: &App, _: &mut Store, _: &Incoming, _: &[&str]) -> Result<Reply, ApiError> {
    Ok(Reply::raw(
        200,
        "text/html; charset=utf-8",
        INDEX_HTML.as_bytes(),
    ))
}

pub fn css(_: &App, _: &mut Store, _: &Incoming, _: &[&str]) -> Result<Reply, ApiError> {
    Ok(Reply::raw(
        200,
        "text/css; charset=utf-8",
        PAGE_CSS.as_bytes(),
    ))
}

pub fn js(_: &App, _: &mut Store, _: &Incoming, _: &[&str]) -> Result<Reply, ApiError> {
    Ok(Reply::raw(
        200,
        "text/javascript; charset=utf-8",
        PAGE_JS.as_bytes(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The policy forbids inline script and style: the page must not need them.
    #[test]
    fn the_page_has_no_inline_script_or_style() {
        let html = INDEX_HTML.to_ascii_lowercase();
        for (i, _) in html.match_indices("<script") {
            let tag = &html[i..i + html[i..].find('>').unwrap_or(0)];
            assert!(tag.contains("src="), "inline script: {tag}");
        }
        assert!(!html.contains("<style"), "a <style> element");
        assert!(!html.contains(" style="), "a style attribute");
        for (i, _) in html.match_indices(" on") {
            let word: String = html[i + 1..]
                .chars()
                .take_while(|c| c.is_ascii_alphabetic())
                .collect();
            assert!(
                !html[i + 1 + word.len()..].starts_with('='),
                "an inline event handler attribute: {word}"
            );
        }
        assert!(!PAGE_JS.contains("innerHTML"), "the script uses innerHTML");
        assert!(!PAGE_JS.contains("insertAdjacentHTML"));
        assert!(!PAGE_JS.contains("localStorage"));
    }
}

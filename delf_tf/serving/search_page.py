"""The search service's web page at `/`: choose or drop a photo, see the ranked results.

Self-contained (no CDN, no external file): one HTML document with its style and
script inline, allowed by a Content-Security-Policy that names their sha256 hashes
and nothing else; pictures come from the service itself (`/thumbnail?key=...`),
the drawings as data: URIs and the chosen photo as a blob: URI.

The script POSTs the file's bytes to `/search` (Content-Type of the file, body =
the encoded image) and renders the answer (`search_api.page_answer`): one card per
result with its thumbnail, rank, score, inliers and key (`data-key`), and the match
drawing of the best few. Results carry `class="result"` and `data-rank` for tests.
"""

from __future__ import annotations

import base64
import hashlib
import html

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px; color: #1f2328; }
h1 { font-size: 20px; margin: 0 0 8px; }
#drop { border: 2px dashed #8c959f; border-radius: 8px; padding: 18px; text-align: center;
  background: #f6f8fa; max-width: 640px; }
#drop.over { border-color: #0969da; background: #ddf4ff; }
#query img { max-width: 320px; max-height: 320px; margin-top: 8px; }
#status { margin: 8px 0; color: #57606a; min-height: 1.4em; }
#status.error { color: #cf222e; }
#results { display: flex; flex-wrap: wrap; gap: 10px; }
.result { width: 180px; border: 3px solid #8c959f; border-radius: 6px; padding: 4px; margin: 0; }
.result.verified { border-color: #1a7f37; }
.result .pic { height: 170px; display: flex; align-items: center; justify-content: center; }
.result .pic img { max-width: 170px; max-height: 170px; }
.result .stats { font-size: 12px; }
.result .key { font-size: 11px; color: #57606a; overflow-wrap: anywhere; }
#matches figure { margin: 10px 0; }
#matches img { max-width: 100%; border: 1px solid #d0d7de; }
#matches figcaption { font-size: 12px; color: #57606a; }
"""

SCRIPT = """
"use strict";
(function () {
  var input = document.getElementById("file");
  var drop = document.getElementById("drop");
  var status = document.getElementById("status");
  var results = document.getElementById("results");
  var matches = document.getElementById("matches");
  var query = document.getElementById("query");
  function say(text, error) {
    status.textContent = text;
    status.className = error ? "error" : "";
  }
  function element(tag, className, text) {
    var node = document.createElement(tag);
    if (className) { node.className = className; }
    if (text !== undefined) { node.textContent = text; }
    return node;
  }
  function render(answer) {
    results.textContent = "";
    matches.textContent = "";
    answer.results.forEach(function (r) {
      var card = element("figure", r.inliers > 0 ? "result verified" : "result");
      card.setAttribute("data-rank", String(r.rank));
      card.setAttribute("data-key", r.key);
      var pic = element("div", "pic");
      var img = document.createElement("img");
      img.src = r.thumbnail;
      img.alt = r.key;
      pic.appendChild(img);
      card.appendChild(pic);
      card.appendChild(element("div", "stats",
        "#" + r.rank + " \\u00b7 " + r.inliers + " inliers \\u00b7 score " + r.score.toFixed(4)));
      card.appendChild(element("figcaption", "key", r.key));
      results.appendChild(card);
      if (r.matches) {
        var figure = element("figure");
        var drawing = document.createElement("img");
        drawing.src = r.matches;
        drawing.alt = "matches with " + r.key;
        figure.appendChild(drawing);
        figure.appendChild(element("figcaption", "",
          "#" + r.rank + " " + r.key + ": " + r.inliers + " inliers"));
        matches.appendChild(figure);
      }
    });
    say(answer.results.length + " results from generation " + answer.generation + " (" +
        answer.images + " images, ranking " + answer.ranking + ", " + answer.query_features +
        " query features, " + answer.seconds.toFixed(2) + " s)", false);
    document.body.setAttribute("data-state", "done");
  }
  function search(file) {
    if (!file) { return; }
    document.body.setAttribute("data-state", "searching");
    query.textContent = "";
    var preview = document.createElement("img");
    preview.src = URL.createObjectURL(file);
    preview.alt = "query";
    query.appendChild(preview);
    say("searching " + file.name + " ...", false);
    var top = document.getElementById("top_k").value;
    fetch("search?top_k=" + encodeURIComponent(top), {
      method: "POST",
      headers: {"Content-Type": file.type || "application/octet-stream"},
      body: file
    }).then(function (response) {
      return response.json().then(function (body) {
        if (!response.ok) { throw new Error(body.error || ("HTTP " + response.status)); }
        return body;
      });
    }).then(render).catch(function (error) {
      results.textContent = "";
      say("error: " + error.message, true);
      document.body.setAttribute("data-state", "error");
    });
  }
  input.addEventListener("change", function () { search(input.files[0]); });
  ["dragenter", "dragover"].forEach(function (name) {
    drop.addEventListener(name, function (e) { e.preventDefault(); drop.className = "over"; });
  });
  ["dragleave", "drop"].forEach(function (name) {
    drop.addEventListener(name, function (e) { e.preventDefault(); drop.className = ""; });
  });
  drop.addEventListener("drop", function (e) {
    if (e.dataTransfer.files.length) { search(e.dataTransfer.files[0]); }
  });
  document.body.setAttribute("data-state", "ready");
})();
"""


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


CSP = (
    "default-src 'none'; "
    f"script-src {_hash(SCRIPT)}; style-src {_hash(STYLE)}; "
    "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'"
)


def render_page(name: str, images: int, generation: int, top_k: int) -> bytes:
    """The page (UTF-8 HTML) for a service named `name` over `images` images."""
    title = f"delf search: {name}"
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="referrer" content="no-referrer">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n"
        '<body data-state="loading">\n'
        f"<h1>{html.escape(title)}</h1>\n"
        f"<p>Which landmark is this? The index holds {images} images "
        f"(generation {generation}).</p>\n"
        '<div id="drop"><p>Drop a photo here, or '
        '<input id="file" type="file" accept="image/*" aria-label="query photo"></p>\n'
        f'<label>results <input id="top_k" type="number" min="1" max="100" value="{top_k}">'
        "</label></div>\n"
        '<div id="query"></div>\n<div id="status" role="status"></div>\n'
        '<div id="results"></div>\n<div id="matches"></div>\n'
        f"<script>{SCRIPT}</script>\n</body>\n</html>\n"
    ).encode()

"""The pages the browser loads from the test sites (tests.browser.support.Sites).

The same documents are served by every site; what a page may do depends only on the origin it
is loaded from, which is the point. Targets come in the query string (``?target=URL``), so one
page serves the real service and the misconfigured control alike.

* ``/client.html`` — ``window.client``: fetch helpers that never throw; each returns
  ``{status, correlationId, body}`` or ``{error: "TypeError: Failed to fetch"}`` and prints a line
  in the page (for the screenshots).
* ``/form.html?target=URL`` — an HTML form that POSTs itself to ``target`` on load (a CSRF attempt).
* ``/frame.html?target=URL`` — ``target`` in an ``<iframe>``; ``body[data-frame-loaded]`` once it loaded.
* ``/link.html?target=URL`` — a plain link to ``target`` (a top-level cross-site GET navigation).
"""

from __future__ import annotations

STYLE = """<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; }
pre { background: #f3f3f3; padding: .6em; white-space: pre-wrap; }
iframe { border: 2px dashed #c33; }
</style>"""

CLIENT = f"""<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>client</title>{STYLE}</head>
<body>
<h1>Browser client at <code id="origin"></code></h1>
<pre id="log"></pre>
<script>
document.getElementById("origin").textContent = location.origin;

function show(label, result) {{
  let line = label + " → ";
  if (result.error) {{
    line += result.error;
  }} else {{
    line += result.status + (result.correlationId ? "  (X-Correlation-ID " + result.correlationId + ")" : "");
  }}
  document.getElementById("log").textContent += line + "\\n";
  return result;
}}

async function call(label, url, init) {{
  try {{
    const response = await fetch(url, init);
    const text = await response.text();
    let body = text;
    try {{ body = JSON.parse(text); }} catch (e) {{ /* not JSON */ }}
    return show(label, {{status: response.status, correlationId: response.headers.get("X-Correlation-ID"), body: body}});
  }} catch (error) {{
    return show(label, {{error: error.name + ": " + error.message}});
  }}
}}

window.client = {{
  note: (text) => {{ document.getElementById("log").textContent += "# " + text + "\\n"; }},
  // The SPA's calls: the session lives in the HttpOnly refresh cookie, hence credentials: "include".
  login: (api, email, password) => call("POST /api/v1/auth/login", api + "/api/v1/auth/login", {{
    method: "POST", credentials: "include",
    headers: {{"Content-Type": "application/json"}}, body: JSON.stringify({{email: email, password: password}})
  }}),
  refresh: (api) => call("POST /api/v1/auth/refresh", api + "/api/v1/auth/refresh", {{method: "POST", credentials: "include"}}),
  createKey: (api, token) => call("POST /api/v1/api-keys", api + "/api/v1/api-keys", {{
    method: "POST", headers: {{"Authorization": "Bearer " + token, "Content-Type": "application/json"}},
    body: JSON.stringify({{name: "from the browser"}})
  }}),
  get: (api, path, headers) => call("GET " + path, api + path, {{headers: headers || {{}}}}),
  credentialed: (api, path) => call("GET " + path + " with credentials", api + path, {{credentials: "include"}}),
  // A "simple" POST (no preflight) whose response the page may not read: what a CSRF attacker can send.
  blindPost: (api, path) => fetch(api + path, {{method: "POST", mode: "no-cors", credentials: "include"}}).then(
    (response) => show("POST " + path + " (no-cors)", {{status: response.type}}),
    (error) => show("POST " + path + " (no-cors)", {{error: error.name + ": " + error.message}})
  ),
}};
</script>
</body>
</html>
"""

FORM = f"""<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>form</title>{STYLE}</head>
<body>
<h1>Auto-submitting form</h1>
<form id="form" method="post"><input type="hidden" name="anything" value="1"></form>
<script>
const form = document.getElementById("form");
form.action = new URLSearchParams(location.search).get("target");
form.submit();
</script>
</body>
</html>
"""

FRAME = f"""<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>frame</title>{STYLE}</head>
<body>
<h1>Framing page at <code id="origin"></code></h1>
<iframe id="victim" width="900" height="420"></iframe>
<script>
document.getElementById("origin").textContent = location.origin;
const frame = document.getElementById("victim");
frame.addEventListener("load", () => {{ document.body.dataset.frameLoaded = "yes"; }});
frame.src = new URLSearchParams(location.search).get("target");
</script>
</body>
</html>
"""

LINK = f"""<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>link</title>{STYLE}</head>
<body>
<h1>A link on another site</h1>
<a id="link">follow me</a>
<script>
document.getElementById("link").href = new URLSearchParams(location.search).get("target");
</script>
</body>
</html>
"""

PAGES = {"/client.html": CLIENT, "/form.html": FORM, "/frame.html": FRAME, "/link.html": LINK}

#!/usr/bin/env python3
"""Test stub for the cardvault browser assets. NOT part of the product.

Serves two loopback origins:
  edge     http://127.0.0.1:A  /v1/collect/frame/cs_test, /v1/collect/assets/<f>,
                               /v1/collect/cardvault.js, POST /v1/collect/submit/cs_test
  merchant http://127.0.0.1:B  /  (page that mounts the frame; ?secret=..&variant=..)
Stub-only helpers on the edge: GET /stub/fail-next (drop the next submit's connection),
GET /stub/last (last submit body, headers and counters), GET /stub/reset.
Frame variants (?variant=): default, nocvc, styled.
Usage: python3 stub_server.py [A=8701] [B=8702]
"""
import base64, hashlib, html, json, os, sys, threading, datetime
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
from urllib.parse import urlsplit, parse_qs

HERE = os.path.dirname(os.path.abspath(__file__))
A = int(sys.argv[1]) if len(sys.argv) > 1 else 8701
B = int(sys.argv[2]) if len(sys.argv) > 2 else 8702
EDGE, MERCHANT = f"http://127.0.0.1:{A}", f"http://127.0.0.1:{B}"
SESSION, SECRET, TOKEN = "cs_test", "s3cret", "tok_AAAAAAAAAAAAAAAAAAAAAA"

def read(name):
    with open(os.path.join(HERE, name), "rb") as f:
        return f.read()

def versioned(name):
    stem, ext = name.rsplit(".", 1)
    return f"{stem}-{hashlib.sha256(read(name)).hexdigest()[:8]}.{ext}"

def sri(name):
    return "sha384-" + base64.b64encode(hashlib.sha384(read(name)).digest()).decode()

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
       "font-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors " + MERCHANT)
VARIANTS = {
    "default": {"require_cvc": True, "style": {}},
    "nocvc": {"require_cvc": False, "style": {}},
    "styled": {"require_cvc": True, "style": {
        "font_family": "serif", "font_size_px": 18, "color": "#f5f5f5", "background_color": "#1e1f24",
        "border_color": "#9aa0a6", "error_color": "#ff8a80", "accent_color": "#ffd54f", "border_radius_px": 12,
        "placeholder_number": "Card number", "placeholder_name": "<b>Jane</b> \"Doe\"",
        "evil": "x", "color_bad": "red"}},
}
STATE = {"fail_next": False, "last": None, "submits": 0, "failures": 0, "done_body": None}
LOCK = threading.Lock()

def luhn(d):
    s = 0
    for i, c in enumerate(reversed(d)):
        n = int(c) * (2 if i % 2 else 1)
        s += n - 9 if n > 9 else n
    return s % 10 == 0

def brand(d):
    if d[:2] in ("34", "37"): return "amex"
    if d[0] == "4": return "visa"
    if "51" <= d[:2] <= "55" or "2221" <= d[:4] <= "2720": return "mastercard"
    return "other"

def vault(body):
    """(status, answer) like the vault would answer."""
    if not isinstance(body, dict): return 400, "invalid_request"
    if body.get("client_secret") != SECRET: return 403, "wrong_secret"
    if STATE["failures"] >= 5: return 409, "session_closed"
    key = json.dumps(body, sort_keys=True)
    if STATE["done_body"] is not None:
        return (200, None) if key == STATE["done_body"] else (409, "session_completed")
    pan = body.get("pan")
    if not isinstance(pan, str) or not pan.isdigit() or not 12 <= len(pan) <= 19 or not luhn(pan):
        return 400, "invalid_pan"
    m, y = body.get("exp_month"), body.get("exp_year")
    if type(m) is not int or type(y) is not int or not 1 <= m <= 12 or not 1000 <= y <= 9999:
        return 400, "invalid_expiry"
    now = datetime.date.today()
    if (y, m) < (now.year, now.month): return 400, "card_expired"
    cvc = body.get("cvc")
    if cvc is not None and (not isinstance(cvc, str) or not cvc.isdigit()
                            or len(cvc) != (4 if brand(pan) == "amex" else 3)):
        return 400, "invalid_cvc"
    name = body.get("cardholder_name")
    if name is not None and (not isinstance(name, str) or not 1 <= len(name) <= 64):
        return 400, "invalid_cardholder_name"
    STATE["done_body"] = key
    return 200, None

class Handler(BaseHTTPRequestHandler):
    server_version = "stub"
    def log_message(self, fmt, *a):
        sys.stderr.write(f"[{self.server.server_port}] {fmt % a}\n")

    def send(self, status, body, ctype, headers=()):
        if isinstance(body, str): body = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        for k, v in headers: self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def jsend(self, status, obj, headers=()):
        self.send(status, json.dumps(obj), "application/json", headers)

    def do_GET(self):
        u = urlsplit(self.path)
        q = parse_qs(u.query)
        if self.server.server_port == B:
            return self.merchant(u.path, q)
        p = u.path
        if p == f"/v1/collect/frame/{SESSION}":
            v = VARIANTS.get(q.get("variant", ["default"])[0], VARIANTS["default"])
            cfg = {"session": SESSION, "allowed_origin": MERCHANT, "require_cvc": v["require_cvc"],
                   "style": v["style"], "submit_url": f"/v1/collect/submit/{SESSION}"}
            page = (read("frame.html").decode()
                    .replace("{{CONFIG_JSON}}", html.escape(json.dumps(cfg), quote=True))
                    .replace("{{FRAME_JS}}", html.escape(versioned("frame.js")))
                    .replace("{{FRAME_CSS}}", html.escape(versioned("frame.css"))))
            return self.send(200, page, "text/html; charset=utf-8", [
                ("Content-Security-Policy", CSP), ("Referrer-Policy", "no-referrer"),
                ("Cross-Origin-Opener-Policy", "same-origin")])
        for name, ctype in (("frame.js", "text/javascript"), ("frame.css", "text/css")):
            if p == "/v1/collect/assets/" + versioned(name):
                return self.send(200, read(name), ctype + "; charset=utf-8",
                                 [("Cross-Origin-Resource-Policy", "same-origin")])
        if p == "/v1/collect/cardvault.js":
            return self.send(200, read("cardvault.js"), "text/javascript; charset=utf-8", [
                ("Cross-Origin-Resource-Policy", "cross-origin"), ("Access-Control-Allow-Origin", "*")])
        if p == "/stub/fail-next":
            STATE["fail_next"] = True
            return self.jsend(200, {"ok": True})
        if p == "/stub/last":
            return self.jsend(200, {k: STATE[k] for k in ("last", "submits", "failures")})
        if p == "/stub/reset":
            STATE.update(fail_next=False, last=None, submits=0, failures=0, done_body=None)
            return self.jsend(200, {"ok": True})
        self.send(404, "not found", "text/plain")

    def do_POST(self):
        if self.server.server_port != A or urlsplit(self.path).path != f"/v1/collect/submit/{SESSION}":
            return self.send(404, "not found", "text/plain")
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(min(n, 4096))
        with LOCK:
            STATE["submits"] += 1
            try: body = json.loads(raw)
            except ValueError: body = None
            STATE["last"] = {"body": body, "content_type": self.headers.get("Content-Type"),
                             "origin": self.headers.get("Origin"), "referer": self.headers.get("Referer"),
                             "cookie": self.headers.get("Cookie"),
                             "sec_fetch_site": self.headers.get("Sec-Fetch-Site")}
            if self.headers.get("Sec-Fetch-Site") not in (None, "same-origin"):
                return self.jsend(403, {"error": {"code": "forbidden", "message": "cross-site"}})
            if STATE["fail_next"]:
                STATE["fail_next"] = False
                vault(body)  # the vault did process it; only the answer is lost
                self.close_connection = True
                self.connection.shutdown(2)
                return
            status, code = vault(body)
            if code:
                if status == 400: STATE["failures"] += 1
                return self.jsend(status, {"error": {"code": code, "message": code.replace("_", " ")}})
            pan = body["pan"]
            return self.jsend(200, {"token": TOKEN, "brand": brand(pan), "last4": pan[-4:],
                                    "exp_month": body["exp_month"], "exp_year": body["exp_year"]})

    def merchant(self, p, q):
        if p == "/":
            page = f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">
<title>Shop checkout (stub)</title><link rel="stylesheet" href="/shop.css">
<script src="{EDGE}/v1/collect/cardvault.js" integrity="{sri('cardvault.js')}" crossorigin="anonymous"></script>
<script src="/shop.js" defer></script></head>
<body><h1>Checkout</h1><p>Pay with card</p><div id="card"></div>
<h2>Result</h2><pre id="result">(waiting)</pre><h2>Errors</h2><pre id="errors"></pre>
<p>token messages seen: <span id="count">0</span></p></body></html>"""
            return self.send(200, page, "text/html; charset=utf-8", [("Content-Security-Policy",
                f"default-src 'none'; script-src 'self' {EDGE}; style-src 'self'; frame-src {EDGE}; base-uri 'none'")])
        if p == "/shop.css":
            return self.send(200, "body{font-family:sans-serif;max-width:440px;margin:16px auto;background:#f4f4f6}"
                             "#card{background:#fff;padding:8px;border:1px solid #ccc}pre{white-space:pre-wrap;word-break:break-all}",
                             "text/css")
        if p == "/shop.js":
            js = f"""(function () {{
  var q = new URLSearchParams(location.search);
  var url = '{EDGE}/v1/collect/frame/{SESSION}' + (q.get('variant') ? '?variant=' + encodeURIComponent(q.get('variant')) : '')
    + '#' + encodeURIComponent(q.get('secret') || '{SECRET}');
  var out = document.getElementById('result'), errs = document.getElementById('errors'), n = 0;
  window.addEventListener('message', function (ev) {{
    if (ev.origin === '{EDGE}' && ev.data && ev.data.type === 'cardvault:token') document.getElementById('count').textContent = ++n;
  }});
  CardVault.mount(document.getElementById('card'), {{ frameUrl: url,
      onError: function (code) {{ errs.textContent += code + '\\n'; }} }})
    .then(function (msg) {{ out.textContent = JSON.stringify(msg); }},
          function (e) {{ out.textContent = 'rejected: ' + e.code; }});
}})();"""
            return self.send(200, js, "text/javascript")
        self.send(404, "not found", "text/plain")

def serve(port):
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()

if __name__ == "__main__":
    threading.Thread(target=serve, args=(B,), daemon=True).start()
    print(f"edge {EDGE}  merchant {MERCHANT}", flush=True)
    serve(A)

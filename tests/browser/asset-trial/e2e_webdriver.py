#!/usr/bin/env python3
"""End-to-end check through chromedriver (W3C WebDriver over urllib). Test helper, not product.
Needs: stub_server.py on 8701/8702, chromedriver on 9515."""
import json, sys, tempfile, time, urllib.request

WD, EDGE, SHOP = "http://127.0.0.1:9515", "http://127.0.0.1:8701", "http://127.0.0.1:8702"
EL = "element-6066-11e4-a52e-4f735466cecf"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--window-size=520,900"]
FAILS = []

def req(method, url, body=None):
    data = json.dumps(body).encode() if body is not None else None
    r = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(r, timeout=60) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return json.loads(e.read())

def check(cond, what):
    print(("PASS " if cond else "FAIL ") + what)
    if not cond: FAILS.append(what)

class S:
    def __init__(self):
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:loggingPrefs": {"browser": "ALL"},
                "goog:chromeOptions": {"binary": "/usr/bin/chromium",
                                       "args": ARGS + ["--user-data-dir=" + tempfile.mkdtemp()]}}}}
        self.id = req("POST", WD + "/session", caps)["value"]["sessionId"]
        self.base = f"{WD}/session/{self.id}"
    def c(self, method, path, body=None):
        v = req(method, self.base + path, body)
        return v.get("value") if isinstance(v, dict) else v
    def go(self, url): self.c("POST", "/url", {"url": url})
    def find(self, css):
        v = self.c("POST", "/element", {"using": "css selector", "value": css})
        return v.get(EL) if isinstance(v, dict) else None
    def js(self, script, *args): return self.c("POST", "/execute/sync", {"script": script, "args": list(args)})
    def keys(self, el, text): return self.c("POST", f"/element/{el}/value", {"text": text})
    def frame(self, el): self.c("POST", "/frame", {"id": {EL: el}})
    def top(self): self.c("POST", "/frame", {"id": None})
    def logs(self):
        v = self.c("POST", "/se/log", {"type": "browser"})
        return v if isinstance(v, list) else []
    def quit(self): req("DELETE", self.base)
    def wait(self, fn, t=8):
        end = time.time() + t
        while time.time() < end:
            v = fn()
            if v: return v
            time.sleep(0.1)
        return fn()
    def attr(self, css, name): return self.js(f"var e=document.querySelector({json.dumps(css)});return e&&e.getAttribute({json.dumps(name)})")
    def val(self, css): return self.js(f"var e=document.querySelector({json.dumps(css)});return e?e.value:null")
    def text(self, css): return self.js(f"var e=document.querySelector({json.dumps(css)});return e?e.textContent:null")
    def clear(self, css): self.c("POST", f"/element/{self.find(css)}/clear", {})

def shot(s, name):
    import base64
    open("/work/assets-wip/" + name, "wb").write(base64.b64decode(s.c("GET", "/screenshot")))

def stub(path): return json.loads(urllib.request.urlopen(EDGE + path).read())

def into_frame(s, query=""):
    s.go(SHOP + "/" + query)
    ifr = s.wait(lambda: s.find("#card iframe"))
    check(bool(ifr), "merchant page mounted an iframe")
    check(s.js("var f=document.querySelector('#card iframe');return [f.title,f.getAttribute('referrerpolicy'),f.hasAttribute('sandbox'),f.hasAttribute('allow')]")
          == ["Card details", "no-referrer", False, False], "iframe title/referrerpolicy, no sandbox/allow")
    s.wait(lambda: s.js("return parseInt(document.querySelector('#card iframe').style.height)") != 300)
    h = s.js("return document.querySelector('#card iframe').style.height")
    s.frame(ifr)
    s.wait(lambda: s.find("[autocomplete=cc-number]"))
    return h

def main():
    stub("/stub/reset")
    s = S()
    try:
        h = into_frame(s)
        s.top()
        s.js("window.postMessage({type:'cardvault:token',token:'tok_FAKE'},'*');window.postMessage({type:'cardvault:resize',height:1999},'*')")
        time.sleep(0.3)
        check(s.text("#result") == "(waiting)" and s.js("return document.querySelector('#card iframe').style.height") == h,
              "forged messages from the merchant window itself are ignored")
        s.frame(s.find("#card iframe"))
        s.js("document.getElementById('cv-number').focus()")
        order = []
        for _ in range(4):
            s.c("POST", "/actions", {"actions": [{"type": "key", "id": "kb", "actions": [
                {"type": "keyDown", "value": "\ue004"}, {"type": "keyUp", "value": "\ue004"}]}]})
            order.append(s.js("return document.activeElement.id"))
        check(order == ["cv-expiry", "cv-cvc", "cv-name", "cv-submit"], "tab order: " + repr(order))
        check(h not in ("300px", ""), f"iframe resized by cardvault:resize (height {h})")
        check(s.js("return location.hash") == "", "client secret removed from frame URL")
        check(s.js("return document.querySelectorAll('[aria-live]').length") == 1, "exactly one aria-live region")
        num = s.find("[autocomplete=cc-number]")
        # Luhn-invalid number + past expiry: client-side errors, nothing posted.
        s.keys(num, "4111111111111112")
        check(s.val("#cv-number") == "4111 1111 1111 1112", "visa formatted 4-4-4-4")
        check(s.text("#cv-brand") == "Visa", "brand shown: Visa")
        s.keys(s.find("[autocomplete=cc-exp]"), "0120")
        check(s.val("#cv-expiry") == "01 / 20", "expiry formatted MM / YY")
        s.keys(s.find("[autocomplete=cc-csc]"), "123\ue007")  # Enter submits
        time.sleep(0.3)
        check(s.attr("#cv-number", "aria-invalid") == "true", "number aria-invalid after Luhn failure")
        check(s.attr("#cv-expiry", "aria-invalid") == "true", "expiry aria-invalid for a past month")
        check(s.attr("#cv-number", "aria-describedby") == "cv-number-err" and bool(s.text("#cv-number-err")),
              "number error message described: " + repr(s.text("#cv-number-err")))
        live = s.wait(lambda: s.text("#cv-live"))
        check("expired" in (live or "") and "4111" not in live, "live region announced: " + repr(live))
        check(s.js("return document.activeElement.id") == "cv-number", "focus moved to first invalid field")
        s.top(); shot(s, "merchant-errors.png"); s.frame(s.find("#card iframe"))
        check(stub("/stub/last")["submits"] == 0, "nothing posted for invalid input")
        # Amex: 4-6-5, 4-digit CVC required.
        s.clear("#cv-number"); s.keys(num, "378282246310005")
        check(s.val("#cv-number") == "3782 822463 10005", "amex formatted 4-6-5")
        check(s.text("#cv-brand") == "American Express", "brand shown: American Express")
        s.clear("#cv-expiry"); s.keys(s.find("#cv-expiry"), "12/2030")
        check(s.val("#cv-expiry") == "12 / 2030", "MM/YYYY accepted: " + repr(s.val("#cv-expiry")))
        s.keys(s.find("#cv-name"), "\ue007")
        time.sleep(0.3)
        check(s.attr("#cv-cvc", "aria-invalid") == "true" and "4-digit" in s.text("#cv-cvc-err"), "amex needs 4-digit cvc")
        # Caret: edit in the middle of the number.
        s.clear("#cv-number"); s.keys(num, "4242424242424242")
        s.js("var e=document.getElementById('cv-number');e.focus();e.setSelectionRange(5,5)")
        s.keys(num, "\ue003")  # Backspace over the space -> deletes the digit before it
        check(s.val("#cv-number") == "4244 2424 2424 242", "backspace after a space deletes the digit: " + repr(s.val("#cv-number")))
        check(s.js("return document.getElementById('cv-number').selectionStart") == 3, "caret kept at the edit point")
        s.clear("#cv-number"); s.keys(num, "4242 4242 4242 4242")
        s.clear("#cv-cvc"); s.keys(s.find("#cv-cvc"), "123")
        s.keys(s.find("#cv-name"), "Jane Doe")
        # Network failure: answer lost, user retries, same token.
        stub("/stub/fail-next")
        s.c("POST", f"/element/{s.find('#cv-submit')}/click", {})
        live = s.wait(lambda: "reach" in (s.text("#cv-live") or "") and s.text("#cv-live"))
        check(bool(live), "network failure announced: " + repr(live))
        check(s.wait(lambda: s.js("return !document.getElementById('cv-submit').disabled")), "button re-enabled after network failure")
        s.keys(s.find("#cv-name"), "\ue007")  # retry with Enter
        done = s.wait(lambda: s.text("#cv-done"))
        check(done == "Card saved: Visa ending in 4242", "card saved state: " + repr(done))
        s.top(); time.sleep(0.3); shot(s, "merchant-saved.png"); s.frame(s.find("#card iframe"))
        check(s.js("return !document.querySelector('#cv-number,#cv-cvc')"), "number and cvc fields gone from DOM")
        last = stub("/stub/last")
        b = last["last"]["body"]
        check(b == {"client_secret": "s3cret", "pan": "4242424242424242", "exp_month": 12, "exp_year": 2030,
                    "cvc": "123", "cardholder_name": "Jane Doe"}, "submit body: " + json.dumps(b))
        check(last["submits"] == 2, "two POSTs (lost answer + retry)")
        print("     submit headers:", {k: v for k, v in last["last"].items() if k != "body"})
        check(last["last"]["cookie"] is None and last["last"]["referer"] is None, "no cookie, no referer on submit")
        check(s.js("return [localStorage.length, sessionStorage.length, document.cookie]") == [0, 0, ""], "nothing stored in frame")
        s.top()
        res = s.wait(lambda: s.text("#result") != "(waiting)" and s.text("#result"))
        print("     #result:", res)
        r = json.loads(res)
        check(r == {"type": "cardvault:token", "session": "cs_test", "token": "tok_AAAAAAAAAAAAAAAAAAAAAA",
                    "brand": "visa", "last4": "4242", "exp_month": 12, "exp_year": 2030}, "token message in #result")
        time.sleep(0.5)
        check(s.text("#count") == "1", "exactly one token message posted")
        check(s.text("#errors") == "network_error\n", "onError got: " + repr(s.text("#errors")))
        logs = s.logs()
        for l in logs: print("     log:", l.get("level"), l.get("message")[:200])
        check(not [l for l in logs if (l.get("level") == "SEVERE" and "ERR_EMPTY_RESPONSE" not in l["message"])
                   or "Content Security Policy" in l.get("message", "")],
              "no console errors / CSP violations besides the simulated dropped connection (%d log lines)" % len(logs))

        # Wrong secret -> final error -> promise rejects.
        stub("/stub/reset")
        into_frame(s, "?secret=wrong&variant=nocvc")
        check(s.find("#cv-cvc") is None, "no cvc field when require_cvc is false")
        s.keys(s.find("#cv-number"), "5555555555554444")
        s.keys(s.find("#cv-expiry"), "1230\ue007")
        live = s.wait(lambda: "verified" in (s.text("#cv-live") or "") and s.text("#cv-live"))
        check(bool(live), "wrong_secret announced: " + repr(live))
        check(s.js("return document.getElementById('cv-submit').disabled && document.getElementById('cv-number').disabled"), "form disabled after a final error")
        b = stub("/stub/last")["last"]["body"]
        check("cvc" not in b and "cardholder_name" not in b, "no cvc/name keys in body: " + json.dumps(b))
        s.top()
        check(s.wait(lambda: s.text("#result") == "rejected: wrong_secret"), "promise rejected with code wrong_secret")
        shot(s, "merchant-wrongsecret.png")
        check(s.text("#errors") == "wrong_secret\n", "onError(wrong_secret)")

        # Server-side field error (card_expired is checked by the stub too; use invalid_cvc via amex+3 digits? client blocks)
        stub("/stub/reset")
        into_frame(s, "?variant=styled")
        check(s.attr("#cv-number", "placeholder") == "Card number", "styled placeholder set")
        check(s.attr("#cv-name", "placeholder") == '<b>Jane</b> "Doe"', "placeholder is plain text")
        check(s.js("return getComputedStyle(document.body).backgroundColor") == "rgb(30, 31, 36)", "background colour applied")
        s.top(); shot(s, "merchant-styled.png")
        logs = s.logs()
        for l in logs: print("     log:", l.get("level"), l.get("message")[:200])
        check(not [l for l in logs if "Content Security Policy" in l.get("message", "")], "no CSP violations (styled/wrong-secret runs)")
        # Negative control: an inline style attribute must be refused and must show up in the log.
        s.frame(s.find("#card iframe"))
        s.js("var d=document.createElement('div');d.innerHTML='<p style=\\'color:red\\'>x</p>';document.body.appendChild(d)")
        time.sleep(0.5)
        check(any("Content Security Policy" in l.get("message", "") for l in s.logs()),
              "negative control: an injected inline style is reported as a CSP violation")
    finally:
        s.quit()
    print("FAILED: %d" % len(FAILS) if FAILS else "ALL PASSED")
    sys.exit(1 if FAILS else 0)

main()

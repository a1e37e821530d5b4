"""keyrack's page in a real browser: headless Chromium through WebDriver (selenium).

Usage: walk.py BASE_URL ADMIN_TOKEN SCREENSHOT_DIR
The server at BASE_URL is a fresh keyrack with an empty database and that admin token.
Walks every flow of the page, checks that no plaintext key is in the DOM except while revealed,
and saves a screenshot of each screen at a phone's width (360 px) and a desktop's (1280 px).
"""

import base64
import json
import os
import secrets
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone

from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

BASE, ADMIN, OUT = sys.argv[1].rstrip("/"), sys.argv[2], sys.argv[3]
os.makedirs(OUT, exist_ok=True)
for old in os.listdir(OUT):
    if old.endswith(".png"):
        os.remove(os.path.join(OUT, old))
EMAIL = "ada@example.com"
PASSWORD = "correct horse battery"
XSS = "<img src=x onerror=alert(1)>"


def key(prefix="sk-test-"):
    return prefix + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(28))


def masked(k):
    return k[:3] + "..." + k[-4:]


def http(method, path, token=None, body=None):
    req = urllib.request.Request(BASE + path, method=method)
    if token:
        req.add_header("Authorization", "Bearer " + token)
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, data=data, timeout=10) as r:
            raw = r.read()
            return r.status, dict(r.headers), raw
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


STARTED = time.monotonic()


def step(name):
    print(f"browser: [{time.monotonic() - STARTED:5.1f} s] {name}", flush=True)


opts = Options()
opts.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
          "--window-size=1280,900", "--lang=en-US"):
    opts.add_argument(a)
opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
driver = webdriver.Chrome(service=Service(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")),
                          options=opts)
driver.set_script_timeout(20)


def js(script, *args):
    return driver.execute_script(script, *args)


def until(what, cond, timeout=15.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = cond()
            if last:
                return last
        except Exception as e:  # the element may be replaced while we look
            last = e
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for: {what} (last: {last!r})")


def by_id(i):
    return driver.find_element(By.ID, i)


def visible(i):
    return by_id(i).is_displayed()


def text(i):
    return by_id(i).text


def active_id():
    return js("return document.activeElement && document.activeElement.id")


def storage_dump():
    return js("""
        const out = [];
        for (const s of [sessionStorage, localStorage])
            for (let i = 0; i < s.length; i++) out.push(s.key(i) + '=' + s.getItem(s.key(i)));
        return out.join('\\n');""")


def dom_and_inputs():
    """The whole DOM as text plus every input's current value."""
    return js("""return document.documentElement.outerHTML + '\\n' +
        Array.from(document.querySelectorAll('input')).map(i => i.value).join('\\n');""")


def assert_not_in_page(secret, where):
    assert secret not in dom_and_inputs(), f"plaintext key in the DOM {where}"
    assert secret not in storage_dump(), f"plaintext key in storage {where}"


def no_alert():
    try:
        driver.switch_to.alert
    except NoAlertPresentException:
        return True
    raise AssertionError("an alert opened: script from an API value ran")


def set_phone(on):
    if on:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": 360, "height": 780, "deviceScaleFactor": 1, "mobile": True})
    else:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def set_dark(on):
    driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {
        "features": [{"name": "prefers-color-scheme", "value": "dark" if on else "light"}]})


SHOTS = []


def shot(name):
    """The screen now, full length, at 360 px and 1280 px."""
    for label, phone in (("phone", True), ("desktop", False)):
        set_phone(phone)
        time.sleep(0.1)
        width = js("return document.documentElement.clientWidth")
        scroll = js("return document.documentElement.scrollWidth")
        assert scroll <= width, f"{name} at {label} width scrolls sideways ({scroll} > {width})"
        png = driver.execute_cdp_cmd("Page.captureScreenshot",
                                     {"format": "png", "captureBeyondViewport": True})
        path = os.path.join(OUT, f"{name}-{label}.png")
        with open(path, "wb") as f:
            f.write(base64.b64decode(png["data"]))
        SHOTS.append(path)
    set_phone(False)


def fill(i, value):
    e = by_id(i)
    e.clear()
    e.send_keys(value)
    return e


def key_rows():
    rows = []
    for tr in driver.find_elements(By.CSS_SELECTOR, "#keys-body tr"):
        cells = {td.get_attribute("data-label"): td for td in tr.find_elements(By.TAG_NAME, "td")}
        rows.append(cells)
    return rows


def row(provider, name=None, default=None):
    for r in key_rows():
        if r["Provider"].text != provider:
            continue
        if name is not None and r["Name"].text != name:
            continue
        if default is not None and (r["Default"].text == "default") != default:
            continue
        return r
    return None


try:
    # ---- headers and the page's settings --------------------------------------------------------
    step("security headers on the page, its assets and the API")
    for path in ("/", "/page.js", "/page.css", "/healthz"):
        status, headers, _ = http("GET", path)
        assert status == 200, (path, status)
        h = {k.lower(): v for k, v in headers.items()}
        csp = h.get("content-security-policy", "")
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, (path, csp)
        assert "unsafe-inline" not in csp, csp
        assert h.get("x-content-type-options") == "nosniff", (path, h)
        assert h.get("referrer-policy") == "no-referrer", (path, h)

    driver.get(BASE + "/")
    until("the login form", lambda: visible("login-view"))
    assert js("return document.documentElement.dataset.revealSeconds") == "30"
    assert active_id() == "login-email", active_id()
    shot("login")

    # ---- register: 422 next to the field, then keyboard only -----------------------------------------
    step("register: 422 messages next to their fields")
    fill("register-email", "not-an-email")
    fill("register-password", PASSWORD).send_keys(Keys.ENTER)
    until("the email error", lambda: visible("register-email-error"))
    assert "email" in text("register-email-error"), text("register-email-error")
    assert active_id() == "register-email"
    assert by_id("register-email").get_attribute("aria-invalid") == "true"
    fill("register-email", EMAIL)
    fill("register-password", "short").send_keys(Keys.ENTER)
    until("the password error", lambda: visible("register-password-error"))
    assert "password" in text("register-password-error").lower()
    assert not visible("register-email-error")
    shot("register-422")

    step("register and log in with the keyboard only (labels, focus order, Enter)")
    for i in ("register-email", "register-password"):
        label = driver.find_element(By.CSS_SELECTOR, f"label[for={i}]")
        assert label.text, f"no label for {i}"
    fill("register-email", EMAIL)
    by_id("register-email").send_keys(Keys.TAB)
    assert active_id() == "register-password", active_id()
    # WebDriver's clear() takes the focus away; the focus order was checked just above.
    by_id("register-password").clear()
    by_id("register-password").send_keys(PASSWORD + Keys.ENTER)
    until("the keys view", lambda: visible("keys-view"))
    assert text("whoami") == EMAIL
    assert active_id() == "keys-title", active_id()
    token = js("return sessionStorage.getItem('keyrack.session')")
    assert token and len(token) > 16
    assert token not in driver.current_url and "?" not in driver.current_url
    assert until("the empty list", lambda: visible("no-keys"))

    # ---- add keys: XSS name as text, 422s, expiry ------------------------------------------------
    step("add a key named like markup; it shows as text")
    k1 = key()
    fill("add-provider", "openai")
    fill("add-name", XSS)
    fill("add-key", k1)
    by_id("add-default").send_keys(Keys.SPACE)
    by_id("add-key").send_keys(Keys.ENTER)
    until("the new row", lambda: row("openai"))
    r = row("openai")
    assert r["Name"].text == XSS, r["Name"].text
    assert r["Default"].text == "default"
    assert r["Key"].text == masked(k1), r["Key"].text
    assert r["Uses"].text == "0"
    assert r["Last used"].text == "never"
    assert r["Expires"].text == "never"
    assert driver.find_elements(By.CSS_SELECTOR, "main img") == []
    no_alert()
    assert by_id("add-key").get_attribute("value") == ""
    assert_not_in_page(k1, "after adding a key")

    step("add: 422 for the key and for an expiry in the past, next to their fields")
    fill("add-provider", "openai")
    fill("add-name", "")
    fill("add-key", "short").send_keys(Keys.ENTER)
    until("the api_key error", lambda: visible("add-key-error"))
    assert "api_key" in text("add-key-error"), text("add-key-error")
    fill("add-key", key())
    fill("add-expires", "2001-01-01T00:00:00Z").send_keys(Keys.ENTER)
    until("the expires_at error", lambda: visible("add-expires-error"))
    assert "future" in text("add-expires-error"), text("add-expires-error")
    assert not visible("add-key-error")
    fill("add-provider", "Not A Provider!")
    fill("add-expires", "").send_keys(Keys.ENTER)
    until("the provider error", lambda: visible("add-provider-error"))
    assert "provider" in text("add-provider-error")
    shot("add-422")

    step("add keys with an expiry; one soon becomes expired")
    soon = (datetime.now(timezone.utc) + timedelta(seconds=4)).strftime("%Y-%m-%dT%H:%M:%SZ")
    k_soon = key("ak-soon-")
    fill("add-provider", "anthropic")
    fill("add-name", "work")
    fill("add-key", k_soon)
    fill("add-expires", soon).send_keys(Keys.ENTER)
    until("the anthropic row", lambda: row("anthropic", "work"))
    k_later = key("ak-later-")
    fill("add-provider", "anthropic")
    fill("add-name", "spare")
    fill("add-key", k_later)
    fill("add-expires", "2099-01-31T12:00:00Z").send_keys(Keys.ENTER)
    until("the spare row", lambda: row("anthropic", "spare"))
    r = row("anthropic", "spare")
    assert r["Default"].text != "default"
    assert r["Expires"].text != "never" and "expired" not in r["Expires"].text
    assert row("anthropic", "work")["Default"].text == "default"

    def expired_shown():
        by_id("refresh").click()
        time.sleep(0.3)
        w = row("anthropic", "work")
        return w and "expired" in w["Expires"].text.lower()

    until("the expired mark", expired_shown, timeout=20)
    assert "expired" not in row("anthropic", "spare")["Expires"].text.lower()
    w = row("anthropic", "work")
    assert w["Actions"].find_elements(By.CSS_SELECTOR, "button.reveal") == [], \
        "an expired key offers Reveal"
    for k in (k_soon, k_later):
        assert_not_in_page(k, "in the list")
    shot("keys")
    set_dark(True)
    light_bg = None
    dark_bg = js("return getComputedStyle(document.body).backgroundColor")
    shot("keys-dark")
    set_dark(False)
    light_bg = js("return getComputedStyle(document.body).backgroundColor")
    assert dark_bg != light_bg, (dark_bg, light_bg)

    # ---- replace the default ----------------------------------------------------------------------
    step("replace the default key of a provider")
    k2 = key()
    fill("replace-provider", "openai")
    fill("replace-key", "bad key").send_keys(Keys.ENTER)
    until("the replace api_key error", lambda: visible("replace-key-error"))
    fill("replace-key", k2).send_keys(Keys.ENTER)
    until("the replaced key", lambda: row("openai", default=True)
          and row("openai", default=True)["Key"].text == masked(k2))
    assert "replaced" in text("notice")
    assert_not_in_page(k2, "after replacing")
    assert_not_in_page(k1, "after replacing")

    # ---- reveal -------------------------------------------------------------------------------------
    step("reveal on request, hide on a click")
    r = row("openai", default=True)
    btn = r["Actions"].find_element(By.CSS_SELECTOR, "button.reveal")
    btn.click()
    until("the revealed key", lambda: driver.find_elements(By.CSS_SELECTOR, "code.revealed"))
    assert driver.find_element(By.CSS_SELECTOR, "code.revealed").text == k2
    assert k2 in dom_and_inputs()
    assert k2 not in storage_dump(), "a revealed key was written to storage"
    shot("revealed")
    row("openai", default=True)["Actions"].find_element(By.CSS_SELECTOR, "button.reveal").click()
    until("hidden", lambda: not driver.find_elements(By.CSS_SELECTOR, "code.revealed"))
    assert_not_in_page(k2, "after hiding by a click")

    step("reveal, then hidden by the timer (the page's 30 s, shortened by the test to 2 s)")
    js("document.documentElement.dataset.revealSeconds = '2'")
    row("openai", default=True)["Actions"].find_element(By.CSS_SELECTOR, "button.reveal").click()
    until("the revealed key", lambda: driver.find_elements(By.CSS_SELECTOR, "code.revealed"))
    shown = time.monotonic()
    assert k2 in dom_and_inputs()
    until("hidden by the timer", lambda: not driver.find_elements(By.CSS_SELECTOR, "code.revealed"),
          timeout=15)
    took = time.monotonic() - shown
    assert took >= 1.5, f"hidden after {took:.1f}s, before the 2 s setting"
    assert_not_in_page(k2, "after the timer")
    js("document.documentElement.dataset.revealSeconds = '30'")

    step("the two reveals show as uses and a last use (counters are written within about a second)")

    def used_twice():
        by_id("refresh").click()
        time.sleep(0.3)
        r = row("openai", default=True)
        return r and r["Uses"].text == "2" and r["Last used"].text != "never"

    until("two uses and a last use", used_twice, timeout=20)

    # ---- delete with a confirmation -------------------------------------------------------------------
    step("delete after a confirmation; Cancel keeps the key")
    row("anthropic", "work")["Actions"].find_element(By.CSS_SELECTOR, "button.delete").click()
    until("the dialog", lambda: by_id("confirm-delete").get_attribute("open") is not None)
    assert "anthropic" in text("confirm-text") and "work" in text("confirm-text")
    shot("confirm-delete")
    by_id("confirm-no").click()
    until("the dialog closed", lambda: by_id("confirm-delete").get_attribute("open") is None)
    time.sleep(0.3)
    assert row("anthropic", "work"), "Cancel deleted the key"
    row("anthropic", "work")["Actions"].find_element(By.CSS_SELECTOR, "button.delete").click()
    until("the dialog", lambda: by_id("confirm-delete").get_attribute("open") is not None)
    by_id("confirm-yes").click()
    until("the row gone", lambda: row("anthropic", "work") is None)
    assert "deleted" in text("notice")
    status, _, raw = http("GET", "/user/api-keys", token)
    names = [k["name"] for k in json.loads(raw)["keys"]]
    assert "work" not in names and "spare" in names, names

    # ---- 401 back to login ---------------------------------------------------------------------------
    step("a 401 (token revoked elsewhere) sends back to login")
    status, _, _ = http("POST", "/auth/logout", token)
    assert status == 204
    by_id("refresh").click()
    until("the login view", lambda: visible("login-view"))
    assert "session has ended" in text("notice"), text("notice")
    assert js("return sessionStorage.getItem('keyrack.session')") is None
    assert not visible("keys-view")
    shot("session-ended")

    step("log in again (Enter submits); the keys are still there; log out")
    fill("login-email", EMAIL)
    fill("login-password", PASSWORD).send_keys(Keys.ENTER)
    until("the keys view", lambda: visible("keys-view"))
    until("the keys", lambda: row("openai", default=True))
    assert row("openai", default=True)["Key"].text == masked(k2)
    assert row("openai", default=True)["Name"].text == XSS
    token = js("return sessionStorage.getItem('keyrack.session')")
    by_id("logout").click()
    until("the login view", lambda: visible("login-view"))
    assert "logged out" in text("notice")
    assert js("return sessionStorage.getItem('keyrack.session')") is None
    assert http("GET", "/user/me", token)[0] == 401, "logging out did not revoke the token"
    assert driver.find_elements(By.CSS_SELECTOR, "#keys-body tr") == []

    # ---- wrong password, then 429 -------------------------------------------------------------------------
    step("a wrong password, then 429 with when to retry")
    fill("login-email", EMAIL)
    fill("login-password", "wrong password").send_keys(Keys.ENTER)
    until("the wrong-password message",
          lambda: "Wrong email or password" in driver.find_element(
              By.CSS_SELECTOR, "#login-form .form-error").text)
    # The failures up to the throttle go straight to the API; the page's next try meets the 429.
    for _ in range(12):
        status, _, _ = http("POST", "/auth/login", None, {"email": EMAIL, "password": "wrong password"})
        if status == 429:
            break
    assert status == 429, status
    fill("login-password", "wrong password").send_keys(Keys.ENTER)
    until("the 429 message", lambda: "Too many attempts" in driver.find_element(
        By.CSS_SELECTOR, "#login-form .form-error").text)
    msg = driver.find_element(By.CSS_SELECTOR, "#login-form .form-error").text
    # The throttle's window is 15 minutes: the wait is said in minutes.
    assert "Too many attempts. Try again in" in msg and "minutes." in msg, msg
    status, headers, _ = http("POST", "/auth/login", None, {"email": EMAIL, "password": "x" * 9})
    assert status == 429 and int(headers["Retry-After"]) >= 120, (status, headers)
    shot("login-429")

    # ---- the operator ----------------------------------------------------------------------------------
    step("operator: a wrong admin token, then the status, the evidence and the events")
    fill("admin-token", "not-the-token").send_keys(Keys.ENTER)
    until("the refusal", lambda: "not accepted" in driver.find_element(
        By.CSS_SELECTOR, "#admin-form .form-error").text)
    fill("admin-token", ADMIN).send_keys(Keys.ENTER)
    until("the admin view", lambda: visible("admin-out"))
    assert by_id("admin-token").get_attribute("value") == ""
    assert ADMIN not in dom_and_inputs() and ADMIN not in storage_dump()
    _, _, raw = http("GET", "/admin/status", ADMIN)
    st = json.loads(raw)
    assert text("admin-phase") == st["phase"], (text("admin-phase"), st["phase"])
    for field in ("users", "column_keys", "table_keys", "unmigrated", "conflicts",
                  "undecryptable", "legacy_reads", "foreign_column_writes"):
        dd = driver.find_element(By.CSS_SELECTOR, f"dd[data-field={field}]")
        assert dd.text == str(st[field]), (field, dd.text, st[field])
    for field in ("last_legacy_read_at", "last_foreign_column_write_at"):
        dd = driver.find_element(By.CSS_SELECTOR, f"dd[data-field={field}]")
        assert (dd.text == "never") == (st[field] is None), (field, dd.text, st[field])
    actions = [td.text for td in driver.find_elements(By.CSS_SELECTOR, "#admin-events-body td.action")]
    for a in ("key.created", "key.replaced", "key.deleted", "login.failed", "login.succeeded"):
        assert a in actions, (a, actions)
    assert len(actions) <= 20
    shot("admin")
    set_dark(True)
    shot("admin-dark")
    set_dark(False)

    step("operator: the users and the service tokens; revoke a token after a confirmation")
    status, _, raw = http("POST", "/admin/service-tokens", ADMIN, {"name": "walk-app", "scope": "write"})
    assert status == 201, (status, raw)
    app_token = json.loads(raw)["token"]
    status, _, raw = http("PUT", "/service/users/ext:walk-1", app_token, {"email": "walker@example.com"})
    assert status == 201, (status, raw)
    by_id("admin-refresh").click()
    until("the users", lambda: any(td.text == "walker@example.com" for td in
                                   driver.find_elements(By.CSS_SELECTOR, "#admin-users-body td.email")))
    people = {tr.find_element(By.CSS_SELECTOR, "td.email").text: tr
              for tr in driver.find_elements(By.CSS_SELECTOR, "#admin-users-body tr.person")}
    assert set(people) >= {EMAIL, "walker@example.com"}, list(people)
    walker = people["walker@example.com"]
    assert walker.find_element(By.CSS_SELECTOR, "td.external-id").text == "walk-1"
    assert walker.find_element(By.CSS_SELECTOR, "td.has-password").text == "none"
    tokens = driver.find_elements(By.CSS_SELECTOR, "#admin-tokens-body tr.service-token")
    assert [t.find_element(By.CSS_SELECTOR, "td.name").text for t in tokens] == ["walk-app"]
    assert app_token not in dom_and_inputs()
    shot("admin-people")
    tokens[0].find_element(By.CSS_SELECTOR, "button.revoke").click()
    until("the confirmation", lambda: by_id("confirm-delete").get_attribute("open") is not None)
    assert "walk-app" in text("confirm-text"), text("confirm-text")
    by_id("confirm-no").click()
    assert http("GET", "/service/users/ext:walk-1", app_token)[0] == 200, "cancel revoked it"
    driver.find_element(By.CSS_SELECTOR, "#admin-tokens-body button.revoke").click()
    until("the confirmation", lambda: by_id("confirm-delete").get_attribute("open") is not None)
    by_id("confirm-yes").click()
    until("the token revoked", lambda: driver.find_element(
        By.CSS_SELECTOR, "#admin-tokens-body td.state").text == "revoked")
    assert driver.find_elements(By.CSS_SELECTOR, "#admin-tokens-body button.revoke") == []
    assert http("GET", "/service/users/ext:walk-1", app_token)[0] == 401

    by_id("admin-forget").click()
    until("the admin view closed", lambda: not visible("admin-out"))
    assert driver.find_elements(By.CSS_SELECTOR, "#admin-events-body tr") == []
    assert driver.find_elements(By.CSS_SELECTOR, "#admin-users-body tr") == []
    assert driver.find_elements(By.CSS_SELECTOR, "#admin-tokens-body tr") == []

    # ---- an invite's link: set your password --------------------------------------------------------------
    if os.environ.get("KEYRACK_BIN") and os.environ.get("KEYRACK_DB"):
        step("an invite link opens the set-your-password form; the token leaves the address")
        out = subprocess.run([os.environ["KEYRACK_BIN"], "--db", os.environ["KEYRACK_DB"], "invite",
                              "ext:walk-1", "--url", BASE], capture_output=True, text=True, check=True)
        link = out.stdout.strip()
        invite = link.rsplit("=", 1)[1]
        driver.get(link)
        until("the set-password form", lambda: visible("set-password-view"))
        assert not visible("login-view") and not visible("keys-view")
        assert invite not in js("return location.href"), js("return location.href")
        assert active_id() == "set-password", active_id()
        fill("set-password", "short").send_keys(Keys.ENTER)
        until("the password error", lambda: visible("set-password-error"))
        shot("set-password-422")
        fill("set-password", "walker's own password").send_keys(Keys.ENTER)
        until("the keys view", lambda: visible("keys-view"))
        assert text("whoami") == "walker@example.com", text("whoami")
        assert "password is set" in text("notice"), text("notice")
        assert invite not in dom_and_inputs() and invite not in storage_dump()
        status, _, _ = http("POST", "/auth/set-password", None,
                            {"token": invite, "password": "another password"})
        assert status == 401, status
        driver.get(BASE + "/#set-password=" + invite)
        until("the set-password form", lambda: visible("set-password-view"))
        fill("set-password", "another password 2").send_keys(Keys.ENTER)
        until("the used-link message", lambda: "unknown, used or expired" in driver.find_element(
            By.CSS_SELECTOR, "#set-password-form .form-error").text)
        shot("set-password-used")

    # ---- the page kept to its own policy -----------------------------------------------------------------
    step("no Content-Security-Policy violation in the console")
    logs = driver.get_log("browser")
    bad = [l["message"] for l in logs if "Content Security Policy" in l["message"]
           or "Refused to" in l["message"]]
    assert not bad, bad
    no_alert()
except BaseException:
    try:
        print("browser: page text at the failure:\n" + js("return document.body.innerText"), flush=True)
        driver.save_screenshot(os.path.join(OUT, "failure.png"))
    except Exception:
        pass
    raise
finally:
    driver.quit()

print(f"browser: all flows passed; {len(SHOTS)} screenshots in {OUT}", flush=True)

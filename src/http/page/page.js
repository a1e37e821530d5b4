// keyrack's page: plain JavaScript over the JSON API, no library, no build step.
// Every value from the API goes into the page with textContent, never as HTML.
// The session token lives in sessionStorage (this tab only, gone when the tab closes, kept
// across a reload); the admin token and a revealed key live in variables only.
"use strict";

(function () {
  const SESSION = "keyrack.session";
  const $ = (id) => document.getElementById(id);

  let adminToken = null;
  // An invite's token (`#set-password=…`), held in this variable only: the address loses it at
  // once, so it is neither kept in the history nor shown.
  let inviteToken = null;
  // The one revealed key: { cell, code, button, timer }; its plaintext is only in code's text.
  let revealed = null;

  // ---- small helpers -------------------------------------------------------------------------

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  function when(rfc3339) {
    if (!rfc3339) return "never";
    const d = new Date(rfc3339);
    return isNaN(d.getTime()) ? rfc3339 : d.toLocaleString();
  }

  function show(node, on) {
    node.hidden = !on;
  }

  function notice(text) {
    const n = $("notice");
    n.textContent = text || "";
    show(n, !!text);
  }

  function sessionToken() {
    try {
      return sessionStorage.getItem(SESSION);
    } catch (_) {
      return null;
    }
  }

  function setSession(token) {
    try {
      if (token) sessionStorage.setItem(SESSION, token);
      else sessionStorage.removeItem(SESSION);
    } catch (_) {
      /* storage refused: the page still works until reload */
    }
  }

  // ---- the API ---------------------------------------------------------------------------------

  // Answers { status, body, retryAfter }; status 0 when the server could not be reached.
  async function api(method, path, body, token) {
    const headers = {};
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (token) headers["Authorization"] = "Bearer " + token;
    let resp;
    try {
      resp = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: "no-store",
        credentials: "omit",
        referrerPolicy: "no-referrer",
      });
    } catch (_) {
      return { status: 0, body: null, retryAfter: null };
    }
    let data = null;
    if (resp.status !== 204) {
      try {
        data = await resp.json();
      } catch (_) {
        data = null;
      }
    }
    return { status: resp.status, body: data, retryAfter: resp.headers.get("Retry-After") };
  }

  function apiMessage(r) {
    return (r.body && r.body.error && r.body.error.message) || "";
  }

  // A sentence for a person about a failed answer (not 401 or 422, which callers place).
  function explain(r) {
    if (r.status === 0) return "The server could not be reached. Check the connection and try again.";
    if (r.status === 429 || r.status === 503) {
      const secs = parseInt(r.retryAfter || "", 10);
      let wait = "a little while";
      if (secs >= 120) wait = Math.ceil(secs / 60) + " minutes";
      else if (!isNaN(secs)) wait = secs + (secs === 1 ? " second" : " seconds");
      const what = r.status === 429 ? "Too many attempts." : "The server is busy.";
      return what + " Try again in " + wait + ".";
    }
    const msg = apiMessage(r);
    if (r.status >= 500) return "The server failed: " + (msg || "status " + r.status) + ".";
    return msg ? msg.charAt(0).toUpperCase() + msg.slice(1) + "." : "The request failed (status " + r.status + ").";
  }

  // ---- form errors ---------------------------------------------------------------------------

  function clearErrors(form) {
    for (const p of form.querySelectorAll(".field-error, .form-error")) {
      p.textContent = "";
      p.hidden = true;
    }
    for (const i of form.querySelectorAll("input")) {
      i.removeAttribute("aria-invalid");
      i.removeAttribute("aria-describedby");
    }
  }

  function formError(form, text) {
    const p = form.querySelector(".form-error");
    p.textContent = text;
    p.hidden = false;
  }

  // A 422 names its field first ("api_key must be ..."): the message goes next to that input.
  function fieldError(form, r) {
    const msg = apiMessage(r) || "A value is not valid.";
    const field = msg.split(/[\s`]/).filter(Boolean)[0];
    const input = Array.from(form.querySelectorAll("input")).find((i) => i.name === field);
    const p = input && $(input.id + "-error");
    if (!p) {
      formError(form, msg);
      return;
    }
    // Kept as the API wrote it: it starts with the field's own name, e.g. `api_key`.
    p.textContent = msg + ".";
    p.hidden = false;
    input.setAttribute("aria-invalid", "true");
    input.setAttribute("aria-describedby", p.id);
    input.focus();
  }

  // The common answers of a user route: 401 ends the session, 422 goes to the field.
  function failed(form, r) {
    if (r.status === 401) {
      sessionEnded();
      return;
    }
    if (r.status === 422 && form) {
      fieldError(form, r);
      return;
    }
    if (form) formError(form, explain(r));
    else keysError(explain(r));
  }

  function keysError(text) {
    const p = $("keys-error");
    p.textContent = text || "";
    show(p, !!text);
  }

  // ---- views ---------------------------------------------------------------------------------

  function showLogin(message) {
    hideRevealed();
    show($("set-password-view"), false);
    setSession(null);
    $("keys-body").replaceChildren();
    show($("keys-view"), false);
    show($("logout"), false);
    $("whoami").textContent = "";
    show($("login-view"), true);
    notice(message);
    $("login-email").focus();
  }

  function sessionEnded() {
    showLogin("Your session has ended. Please log in again.");
  }

  async function showKeys(focus) {
    const token = sessionToken();
    if (!token) {
      showLogin("");
      return;
    }
    const me = await api("GET", "/user/me", undefined, token);
    if (me.status !== 200) {
      if (me.status === 401) sessionEnded();
      else {
        showLogin("");
        notice(explain(me));
      }
      return;
    }
    $("whoami").textContent = me.body.user.email;
    show($("login-view"), false);
    show($("logout"), true);
    show($("keys-view"), true);
    await loadKeys();
    if (focus) $("keys-title").focus();
  }

  async function loadKeys() {
    hideRevealed();
    const r = await api("GET", "/user/api-keys", undefined, sessionToken());
    if (r.status !== 200) {
      failed(null, r);
      return;
    }
    keysError("");
    $("phase-line").textContent = "Phase: " + r.body.phase;
    const body = $("keys-body");
    body.replaceChildren();
    for (const k of r.body.keys) body.appendChild(keyRow(k));
    show($("no-keys"), r.body.keys.length === 0);
    show($("keys"), r.body.keys.length > 0);
  }

  function cell(label, text, cls) {
    const td = el("td", text, cls);
    td.setAttribute("data-label", label);
    return td;
  }

  function keyRow(k) {
    const tr = document.createElement("tr");
    tr.className = "key";
    if (k.expired) tr.classList.add("is-expired");
    tr.appendChild(cell("Provider", k.provider));
    tr.appendChild(cell("Name", k.name || "—", "name"));
    tr.appendChild(cell("Default", k.is_default ? "default" : "—", "default"));
    const keyCell = cell("Key", null, "masked");
    keyCell.appendChild(el("code", k.masked_key || "…"));
    tr.appendChild(keyCell);
    tr.appendChild(cell("Uses", k.usage_count, "uses"));
    tr.appendChild(cell("Last used", k.last_used_at ? when(k.last_used_at) : "never", "last-used"));
    // One element per cell, so that the phone layout's label column lines up.
    const exp = cell("Expires", null, "expires");
    const expText = exp.appendChild(el("span", when(k.expires_at)));
    if (k.expired) {
      expText.appendChild(document.createTextNode(" "));
      expText.appendChild(el("strong", "expired", "badge"));
    }
    tr.appendChild(exp);

    const actions = cell("Actions", null, "actions").appendChild(el("span"));
    // The API reveals a provider's default key, so only the default row offers it.
    if (k.is_default && !k.expired) {
      const b = el("button", "Reveal", "reveal");
      b.type = "button";
      b.setAttribute("aria-label", "Reveal the " + k.provider + " default key");
      b.addEventListener("click", () => toggleReveal(k, keyCell, b));
      actions.appendChild(b);
    }
    const del = el("button", "Delete", "delete danger");
    del.type = "button";
    del.setAttribute("aria-label", "Delete the " + k.provider + " key " + (k.name || k.masked_key || ""));
    del.addEventListener("click", () => confirmDelete(k, del));
    actions.appendChild(del);
    tr.appendChild(actions.parentNode);
    return tr;
  }

  // ---- reveal --------------------------------------------------------------------------------

  function revealSeconds() {
    const s = parseFloat(document.documentElement.getAttribute("data-reveal-seconds"));
    return s > 0 ? s : 30;
  }

  async function toggleReveal(k, keyCell, button) {
    if (revealed && revealed.button === button) {
      hideRevealed();
      return;
    }
    hideRevealed();
    const q = "?provider=" + encodeURIComponent(k.provider) + "&reveal=true";
    const r = await api("GET", "/user/api-key" + q, undefined, sessionToken());
    if (r.status !== 200) {
      failed(null, r);
      return;
    }
    if (!r.body.has_key || typeof r.body.api_key !== "string") {
      keysError(r.body.expired ? "This key has expired; it cannot be revealed." : "There is no key to reveal.");
      return;
    }
    keysError("");
    const code = el("code", r.body.api_key, "revealed");
    code.title = "Click to hide";
    code.addEventListener("click", hideRevealed);
    keyCell.firstChild.hidden = true;
    keyCell.appendChild(code);
    button.textContent = "Hide";
    button.setAttribute("aria-pressed", "true");
    const timer = setTimeout(hideRevealed, revealSeconds() * 1000);
    revealed = { keyCell, code, button, timer };
  }

  // Removes the plaintext from the DOM and forgets it.
  function hideRevealed() {
    if (!revealed) return;
    const { keyCell, code, button, timer } = revealed;
    revealed = null;
    clearTimeout(timer);
    code.textContent = "";
    code.remove();
    if (keyCell.firstChild) keyCell.firstChild.hidden = false;
    button.textContent = "Reveal";
    button.removeAttribute("aria-pressed");
  }

  // ---- delete ---------------------------------------------------------------------------------

  function confirmDelete(k, opener) {
    hideRevealed();
    const dialog = $("confirm-delete");
    const label = k.name ? "“" + k.name + "”" : k.masked_key || "";
    $("confirm-text").textContent =
      "Delete the " + k.provider + " key " + label + "? This cannot be undone.";
    dialog.onclose = async () => {
      dialog.onclose = null;
      if (dialog.returnValue !== "delete") {
        opener.focus();
        return;
      }
      const path =
        k.id === null
          ? "/user/api-key?provider=" + encodeURIComponent(k.provider)
          : "/user/api-keys/" + encodeURIComponent(k.id);
      const r = await api("DELETE", path, undefined, sessionToken());
      if (r.status !== 204) {
        failed(null, r);
        return;
      }
      notice("The key was deleted.");
      await loadKeys();
      $("keys-title").focus();
    };
    dialog.returnValue = "";
    dialog.showModal();
  }

  // ---- forms ----------------------------------------------------------------------------------

  function value(form, name) {
    return form.elements[name].value;
  }

  async function login(email, password, form) {
    const r = await api("POST", "/auth/login", { email, password });
    if (r.status === 200) {
      setSession(r.body.token);
      form.reset();
      notice("");
      await showKeys(true);
      return true;
    }
    if (r.status === 401) formError(form, "Wrong email or password.");
    else if (r.status === 422) fieldError(form, r);
    else formError(form, explain(r));
    return false;
  }

  $("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = ev.target;
    clearErrors(f);
    await login(value(f, "email"), value(f, "password"), f);
  });

  $("register-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = ev.target;
    clearErrors(f);
    const email = value(f, "email");
    const password = value(f, "password");
    const r = await api("POST", "/auth/register", { email, password });
    if (r.status === 201) {
      await login(email, password, f);
      return;
    }
    if (r.status === 422) fieldError(f, r);
    else formError(f, explain(r));
  });

  $("logout").addEventListener("click", async () => {
    const token = sessionToken();
    if (token) await api("POST", "/auth/logout", undefined, token);
    showLogin("You are logged out.");
  });

  $("refresh").addEventListener("click", () => loadKeys());

  // ---- an invite: set your password ---------------------------------------------------------

  function takeInvite() {
    const m = /^#set-password=([A-Za-z0-9_-]+)$/.exec(location.hash);
    if (!m) return false;
    inviteToken = m[1];
    history.replaceState(null, "", location.pathname + location.search);
    show($("login-view"), false);
    show($("keys-view"), false);
    show($("set-password-view"), true);
    $("set-password").focus();
    return true;
  }

  $("set-password-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = ev.target;
    clearErrors(f);
    const r = await api("POST", "/auth/set-password", { token: inviteToken, password: value(f, "password") });
    if (r.status === 200) {
      inviteToken = null;
      f.reset();
      setSession(r.body.token);
      show($("set-password-view"), false);
      notice("Your password is set.");
      await showKeys(true);
      return;
    }
    if (r.status === 401) formError(f, "This link is unknown, used or expired. Ask for a new one.");
    else if (r.status === 422) fieldError(f, r);
    else formError(f, explain(r));
  });

  function keyBody(f, withName) {
    const body = {
      provider: value(f, "provider").trim(),
      api_key: value(f, "api_key"),
    };
    const expires = value(f, "expires_at").trim();
    if (expires) body.expires_at = expires;
    if (withName) {
      const name = value(f, "name");
      if (name.trim()) body.name = name;
      if (f.elements["is_default"].checked) body.is_default = true;
    }
    return body;
  }

  $("add-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = ev.target;
    clearErrors(f);
    const r = await api("POST", "/user/api-keys", keyBody(f, true), sessionToken());
    if (r.status !== 201) {
      failed(f, r);
      return;
    }
    f.reset();
    notice("The key was added.");
    await loadKeys();
  });

  $("replace-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = ev.target;
    clearErrors(f);
    const r = await api("POST", "/user/api-key", keyBody(f, false), sessionToken());
    if (r.status !== 200) {
      failed(f, r);
      return;
    }
    f.reset();
    notice("The default " + r.body.provider + " key was replaced.");
    await loadKeys();
  });

  // ---- the operator's view ------------------------------------------------------------------------

  const COUNTS = [
    ["users", "Users"],
    ["column_keys", "Keys in the legacy column"],
    ["table_keys", "Keys in the api_keys table"],
    ["unmigrated", "Not yet migrated"],
    ["conflicts", "Conflicts"],
    ["undecryptable", "Undecryptable"],
    ["backfill_users_left", "Backfill: users left"],
    ["schema_version", "Schema version"],
  ];
  const EVIDENCE = [
    ["legacy_reads", "Legacy reads"],
    ["last_legacy_read_at", "Last legacy read"],
    ["foreign_column_writes", "Foreign column writes"],
    ["last_foreign_column_write_at", "Last foreign column write"],
  ];

  function fillList(dl, pairs, data) {
    dl.replaceChildren();
    for (const [field, label] of pairs) {
      const v = data[field];
      dl.appendChild(el("dt", label));
      const dd = el("dd", field.endsWith("_at") ? (v ? when(v) : "never") : v === undefined ? "—" : v);
      dd.setAttribute("data-field", field);
      dl.appendChild(dd);
    }
  }

  function forgetAdmin(message) {
    adminToken = null;
    show($("admin-out"), false);
    $("admin-counts").replaceChildren();
    $("admin-evidence").replaceChildren();
    $("admin-events-body").replaceChildren();
    $("admin-users-body").replaceChildren();
    $("admin-tokens-body").replaceChildren();
    $("admin-phase").textContent = "";
    const f = $("admin-form");
    show(f, true);
    clearErrors(f);
    if (message) formError(f, message);
  }

  async function loadAdmin() {
    const f = $("admin-form");
    clearErrors(f);
    const [s, e, u, t] = await Promise.all([
      api("GET", "/admin/status", undefined, adminToken),
      api("GET", "/admin/events?limit=20", undefined, adminToken),
      api("GET", "/admin/users?limit=100", undefined, adminToken),
      api("GET", "/admin/service-tokens", undefined, adminToken),
    ]);
    for (const r of [s, e, u, t]) {
      if (r.status === 401) return forgetAdmin("The admin token was not accepted.");
      if (r.status === 404) return forgetAdmin("This server has no admin token configured.");
      if (r.status !== 200) return forgetAdmin(explain(r));
    }
    $("admin-phase").textContent = s.body.phase;
    fillList($("admin-counts"), COUNTS, s.body);
    fillList($("admin-evidence"), EVIDENCE, s.body);
    const body = $("admin-events-body");
    body.replaceChildren();
    for (const ev of e.body.events) {
      const tr = document.createElement("tr");
      tr.appendChild(cell("At", when(ev.at)));
      tr.appendChild(cell("Action", ev.action, "action"));
      tr.appendChild(cell("Actor", ev.actor));
      tr.appendChild(cell("User", ev.user_id ?? "—"));
      tr.appendChild(cell("Key", ev.api_key_id ?? "—"));
      tr.appendChild(cell("Provider", ev.provider ?? "—"));
      const details = [];
      if (ev.source) details.push("source " + ev.source);
      if (ev.from || ev.to) details.push((ev.from ?? "?") + " → " + (ev.to ?? "?"));
      if (ev.count > 1) details.push(ev.count + " times, the last " + when(ev.last_at));
      tr.appendChild(cell("Details", details.join(", ") || "—"));
      body.appendChild(tr);
    }
    if (e.body.events.length === 0) {
      const tr = document.createElement("tr");
      tr.appendChild(cell("At", "No events yet."));
      body.appendChild(tr);
    }
    fillUsers(u.body.users);
    fillTokens(t.body.service_tokens);
    show(f, false);
    show($("admin-out"), true);
  }

  function fillUsers(users) {
    const body = $("admin-users-body");
    body.replaceChildren();
    for (const p of users) {
      const tr = document.createElement("tr");
      tr.className = "person";
      tr.appendChild(cell("Id", p.id));
      tr.appendChild(cell("Email", p.email, "email"));
      tr.appendChild(cell("External id", p.external_id ?? "—", "external-id"));
      tr.appendChild(cell("Keys", p.key_count, "key-count"));
      tr.appendChild(cell("Password", p.has_password ? "set" : "none", "has-password"));
      tr.appendChild(cell("Last login", when(p.last_login_at)));
      tr.appendChild(cell("Created", when(p.created_at)));
      body.appendChild(tr);
    }
    if (users.length === 0) body.appendChild(el("tr")).appendChild(cell("Id", "No users yet."));
  }

  function fillTokens(tokens) {
    const body = $("admin-tokens-body");
    body.replaceChildren();
    $("admin-tokens-error").hidden = true;
    for (const t of tokens) {
      const tr = document.createElement("tr");
      tr.className = "service-token";
      tr.appendChild(cell("Name", t.name, "name"));
      tr.appendChild(cell("Scope", t.scope, "scope"));
      tr.appendChild(cell("Created", when(t.created_at)));
      tr.appendChild(cell("Last used", when(t.last_used_at)));
      tr.appendChild(cell("Expires", when(t.expires_at)));
      tr.appendChild(cell("State", t.revoked ? "revoked" : "live", "state"));
      const actions = cell("Actions", null, "actions").appendChild(el("span"));
      if (!t.revoked) {
        const b = el("button", "Revoke", "revoke danger");
        b.type = "button";
        b.setAttribute("aria-label", "Revoke the service token " + t.name);
        b.addEventListener("click", () => confirmRevoke(t, b));
        actions.appendChild(b);
      }
      tr.appendChild(actions.parentNode);
      body.appendChild(tr);
    }
    if (tokens.length === 0) body.appendChild(el("tr")).appendChild(cell("Name", "No service tokens."));
  }

  function confirmRevoke(t, opener) {
    const dialog = $("confirm-delete");
    const yes = $("confirm-yes");
    $("confirm-text").textContent =
      "Revoke the service token " + t.name + "? Applications using it get 401 from their next request.";
    yes.textContent = "Revoke";
    dialog.onclose = async () => {
      dialog.onclose = null;
      yes.textContent = "Delete";
      if (dialog.returnValue !== "delete") {
        opener.focus();
        return;
      }
      const r = await api("DELETE", "/admin/service-tokens/" + encodeURIComponent(t.name), undefined, adminToken);
      if (r.status !== 204) {
        const p = $("admin-tokens-error");
        p.textContent = explain(r);
        p.hidden = false;
        return;
      }
      await loadAdmin();
    };
    dialog.returnValue = "";
    dialog.showModal();
  }

  $("admin-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const input = $("admin-token");
    adminToken = input.value;
    input.value = "";
    if (!adminToken) {
      forgetAdmin("Type the admin token.");
      return;
    }
    await loadAdmin();
    if (adminToken) $("admin-title").focus();
  });
  $("admin-refresh").addEventListener("click", () => loadAdmin());
  $("admin-forget").addEventListener("click", () => {
    forgetAdmin("");
    $("admin-token").focus();
  });

  // A revealed key does not stay on a page the person has left.
  document.addEventListener("visibilitychange", () => {
    if (document.hidden) hideRevealed();
  });
  window.addEventListener("pagehide", hideRevealed);

  // A link opened in a tab that shows the page already changes only the address's fragment.
  window.addEventListener("hashchange", () => {
    if (takeInvite()) hideRevealed();
  });
  if (!takeInvite()) showKeys(false);
})();

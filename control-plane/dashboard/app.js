// The Berth dashboard: one page that calls the control plane's own API
// (/v1/...) with the session cookie, and keeps itself current from the
// event stream. No framework and no build step: the control plane embeds
// this file as it is. Every text is put in with textContent (never HTML).

const view = document.getElementById("view");
let csrf = null;
let current = null; // the page shown: { refresh(), stop() }

// ---- small helpers ------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function table(headers, rows, empty = "none") {
  if (!rows.length) return h("p", { class: "muted" }, empty);
  return h("table", {},
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))),
    h("tbody", {}, rows));
}

const ago = (secs) => {
  if (secs === null || secs === undefined) return "never";
  if (secs < 60) return `${secs} s ago`;
  if (secs < 3600) return `${Math.floor(secs / 60)} min ago`;
  return `${Math.floor(secs / 3600)} h ago`;
};
const when = (unix) => (unix ? new Date(unix * 1000).toISOString().replace("T", " ").slice(0, 19) : "–");
const bytes = (n) => {
  if (n === null || n === undefined) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
};
const cpu = (m) => (m === null || m === undefined ? "–" : `${(m / 1000).toFixed(2)} cores`);
const enc = encodeURIComponent;

// ---- the API ------------------------------------------------------------

class ApiFailure extends Error {
  constructor(status, body) {
    super(body.error || `HTTP ${status}`);
    this.status = status;
    this.code = body.code || "unknown";
    this.field = body.field || null;
  }
}

async function api(method, path, body, retried = false) {
  const headers = {};
  if (body !== undefined) headers["content-type"] = "application/json";
  if (method !== "GET" && csrf) headers["x-csrf-token"] = csrf;
  const res = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (res.status === 204) return null;
  const text = await res.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch { json = { error: text }; }
  if (!res.ok) {
    const f = new ApiFailure(res.status, json || {});
    // Signed in again in another tab: this tab's CSRF token is stale.
    if (f.code === "csrf_required" && !retried && path !== "/v1/session") {
      const s = await api("GET", "/v1/session", undefined, true);
      csrf = s.csrf;
      return api(method, path, body, true);
    }
    // The session ended (logout elsewhere, expiry, user removed).
    if (res.status === 401 && path !== "/v1/session") showLogin("Your session ended; sign in again.");
    throw f;
  }
  return json;
}

// Reads a streamed response line by line until `signal` aborts it or the
// server ends it. `parse` false hands over raw text lines (build logs).
async function follow(path, signal, onLine, parse = true) {
  const res = await fetch(path, { credentials: "same-origin", signal });
  if (!res.ok) {
    let body = {};
    try { body = await res.json(); } catch { /* not JSON */ }
    throw new ApiFailure(res.status, body);
  }
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let rest = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    rest += value;
    const lines = rest.split("\n");
    rest = lines.pop();
    for (const l of lines) {
      if (!l) continue;
      if (!parse) { onLine(l); continue; }
      try { onLine(JSON.parse(l)); } catch { /* a torn line: skip */ }
    }
  }
  if (rest && !parse) onLine(rest);
}

// Shows `err` next to the form field it names (or at the form's top).
function showError(form, err) {
  clearErrors(form);
  const field = err.field ? err.field.split(/[.[]/)[0] : null;
  const slot = (field && form.querySelector(`[data-error-for="${CSS.escape(field)}"]`))
    || form.querySelector('[data-error-for="_form"]');
  if (slot) slot.textContent = err.message;
  const input = field && form.querySelector(`[name="${CSS.escape(field)}"]`);
  if (input) { input.setAttribute("aria-invalid", "true"); input.focus(); }
}

function clearErrors(form) {
  form.querySelectorAll(".field-error").forEach((e) => { e.textContent = ""; });
  form.querySelectorAll("[aria-invalid]").forEach((e) => e.removeAttribute("aria-invalid"));
}

const errorSlot = (field) => h("p", { class: "field-error", "data-error-for": field, role: "alert" });

// Runs `action` for a submitted form; errors land next to their field.
function onSubmit(form, action) {
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearErrors(form);
    const button = form.querySelector("button[type=submit]");
    if (button) button.disabled = true;
    try {
      await action(new FormData(form));
    } catch (err) {
      showError(form, err instanceof ApiFailure ? err : { message: String(err.message || err), field: err.field });
    } finally {
      if (button) button.disabled = false;
    }
  });
  return form;
}

// ---- sign-in --------------------------------------------------------------

function showLogin(message) {
  csrf = null;
  liveAbort?.abort();
  liveAbort = null;
  if (current) current.stop();
  current = null;
  document.getElementById("top").hidden = true;
  const form = h("form", { class: "stack", id: "login-form" },
    h("h1", {}, "Sign in to Berth"),
    message ? h("p", { class: "notice" }, message) : null,
    h("label", { for: "login-user" }, "User"),
    h("input", { id: "login-user", name: "user", autocomplete: "username" }),
    h("label", { for: "login-password" }, "Password"),
    h("input", { id: "login-password", name: "password", type: "password", autocomplete: "current-password" }),
    h("p", { class: "muted" }, "…or leave the user empty and paste the admin token as the password."),
    errorSlot("credentials"),
    errorSlot("_form"),
    h("button", { type: "submit" }, "Sign in"));
  onSubmit(form, async (data) => {
    const user = data.get("user").trim();
    const secret = data.get("password");
    const body = user ? { user, password: secret } : { token: secret };
    const s = await api("POST", "/v1/session", body);
    started(s);
  });
  view.replaceChildren(h("section", { class: "card login" }, form));
}

function started(session) {
  csrf = session.csrf;
  document.getElementById("who").textContent = session.user;
  document.getElementById("top").hidden = false;
  route();
}

document.getElementById("logout").addEventListener("click", async () => {
  try { await api("DELETE", "/v1/session"); } catch { /* gone already */ }
  showLogin("Signed out.");
});

// ---- live updates -------------------------------------------------------

// One event stream for the whole page: every event refreshes what is shown
// (a little later, so a burst of events costs one refresh); a slow timer
// keeps figures that change without events (CPU, handshakes) current.
let liveAbort = null;
let pending = null;

function startLive() {
  if (liveAbort) return;
  liveAbort = new AbortController();
  const signal = liveAbort.signal;
  const loop = async () => {
    while (!signal.aborted) {
      try {
        await follow("/v1/events?follow=true&tail=0", signal, () => {
          if (!pending) pending = setTimeout(() => { pending = null; current?.refresh(); }, 250);
        });
      } catch (e) {
        if (signal.aborted || (e instanceof ApiFailure && e.status === 401)) return;
      }
      await new Promise((r) => setTimeout(r, 2000));
    }
  };
  loop();
}

setInterval(() => { if (csrf && document.visibilityState === "visible") current?.refresh(); }, 5000);

// ---- pages --------------------------------------------------------------

// A page: `draw()` returns fresh content for its container; streams it
// opens are tied to `signal` and end when the page is left.
function page(title, draw, extra = () => {}, { extraFirst = false } = {}) {
  const abort = new AbortController();
  const body = h("div", {});
  const more = h("div", { class: "extra" });
  const root = h("div", {}, h("h1", {}, title), extraFirst ? [more, body] : [body, more]);
  let busy = false;
  let again = false;
  const refresh = async () => {
    // An event during a draw asks for one more, with what came after it.
    if (busy) { again = true; return; }
    busy = true;
    try {
      const el = await draw();
      // Keep what the user is typing: redraw only the data part.
      body.replaceChildren(el);
    } catch (e) {
      if (!(e instanceof ApiFailure && e.status === 401)) {
        body.replaceChildren(h("p", { class: "notice bad" }, e.message));
      }
    } finally {
      busy = false;
      if (again && !abort.signal.aborted) { again = false; refresh(); }
    }
  };
  extra(more, abort.signal, refresh);
  return { root, refresh, stop: () => abort.abort() };
}

function healthyCount(svc) {
  return svc.replicas.filter((r) => r.state === "running" && r.healthy !== false).length;
}

function stateClass(s) {
  return { running: "ok", complete: "ok", valid: "ok", succeeded: "ok", online: "ok", passthrough: "ok",
    failed: "bad", offline: "bad", exited: "bad", "rolled-back": "warn", rolling: "warn", pending: "warn",
    queued: "warn" }[s] || "";
}
const pill = (s) => h("span", { class: `pill ${stateClass(s)}`, "data-state": s }, s);

function rolloutProgress(r) {
  if (!r) return "–";
  const done = r.steps.filter((s) => s.stage === "done").length;
  return `${r.rolling_back ? "rolling back" : r.state} ${done}/${r.steps.length}`;
}

function overview() {
  return page("Overview", async () => {
    const [nodes, services, domains] = await Promise.all([
      api("GET", "/v1/nodes"), api("GET", "/v1/services"), api("GET", "/v1/domains")]);
    const online = nodes.filter((n) => n.online).length;
    const healthy = services.filter((s) => healthyCount(s) >= s.spec.replicas).length;
    return h("div", {},
      h("div", { class: "grid" },
        h("div", { class: "stat" }, h("b", { id: "stat-nodes" }, `${online}/${nodes.length}`), "nodes online"),
        h("div", { class: "stat" }, h("b", {}, `${healthy}/${services.length}`), "services healthy"),
        h("div", { class: "stat" }, h("b", {}, String(domains.length)), "domains")),
      h("h2", {}, "Nodes"),
      h("section", { class: "card" }, nodeTable(nodes)),
      h("h2", {}, "Services"),
      h("section", { class: "card" }, table(
        ["Service", "Healthy / desired", "Image", "Release", "Rollout"],
        services.map((s) => h("tr", { "data-service": s.spec.name },
          h("td", {}, h("a", { href: `#/services/${enc(s.spec.name)}` }, s.spec.name)),
          h("td", { class: "num", "data-healthy": `${healthyCount(s)}/${s.spec.replicas}` },
            `${healthyCount(s)} / ${s.spec.replicas}`),
          h("td", {}, s.spec.image),
          h("td", { class: "num" }, s.current_release ?? "–"),
          h("td", {}, rolloutProgress(s.rollout)))),
        "No services yet: launch one.")),
      h("h2", {}, "Domains"),
      h("section", { class: "card" }, table(
        ["Domain", "Service", "Certificate", "Expires", "Proxies serving"],
        domains.map((d) => h("tr", {},
          h("td", {}, d.spec.domain),
          h("td", {}, h("a", { href: `#/services/${enc(d.spec.service)}` }, d.spec.service), `:${d.spec.port}`),
          h("td", {}, pill(d.cert_state), d.last_error ? h("div", { class: "bad" }, d.last_error) : null),
          h("td", {}, d.cert_not_after || "–"),
          h("td", { class: "num" }, `${d.proxies_serving} / ${d.proxies_online}`))),
        "No domains.")));
  });
}

// A node's peers: how many had a recent handshake, then each one down.
// (Reports name only the peers down; every peer's age is in its agent's metrics.)
const peersUp = (n) => (n.peers_up === null || n.peers_up === undefined ? "–" : `${n.peers_up} up`);
const peerDown = (p) => `${p.name}: down, last handshake ${ago(p.handshake_age_secs)}`;

function nodeTable(nodes) {
  return table(
    ["Node", "Role", "State", "Version", "Mesh IP", "Peers", "CPU", "Memory"],
    nodes.map((n) => h("tr", { "data-node": n.name },
      h("td", {}, h("a", { href: `#/nodes/${enc(n.name)}` }, n.name)),
      h("td", {}, n.role),
      h("td", {}, pill(n.online ? "online" : "offline"), n.error ? h("div", { class: "bad" }, n.error) : null),
      h("td", {}, n.agent_version || "–"),
      h("td", {}, n.mesh_ip),
      h("td", {}, peersUp(n), n.peers.map((p) => h("div", { class: "bad" }, peerDown(p)))),
      h("td", {}, n.usage ? `${cpu(n.usage.cpu_millicores)} of ${n.usage.cores}` : "–"),
      h("td", {}, n.usage ? `${bytes(n.usage.memory_used_bytes)} of ${bytes(n.usage.memory_total_bytes)}` : "–"))),
    "No nodes yet: create a join token.");
}

function replicaTable(replicas, withNode = true) {
  return table(
    ["Replica", withNode ? "Node" : null, "IP", "State", "Health", "Restarts", "Release", "CPU", "Memory", "Last error"]
      .filter((x) => x !== null),
    replicas.map((r) => h("tr", { "data-replica": r.replica },
      h("td", {}, r.replica),
      withNode ? h("td", {}, h("a", { href: `#/nodes/${enc(r.node)}` }, r.node)) : null,
      h("td", {}, r.ip || "–"),
      h("td", {}, pill(r.state), r.gave_up ? h("div", { class: "bad" }, "gave up") : null),
      h("td", {}, r.healthy === null || r.healthy === undefined ? "–" : r.healthy ? "healthy" : "unhealthy"),
      h("td", { class: "num" }, r.restarts),
      h("td", { class: "num" }, r.release ?? "–"),
      h("td", {}, cpu(r.cpu_millicores)),
      h("td", {}, bytes(r.memory_bytes)),
      h("td", { class: "bad" }, r.error || ""))),
    "No replicas.");
}

// A live log pane fed by an NDJSON stream of LogLine (service or node logs).
function logPane(into, signal, path, id) {
  const pre = h("pre", { class: "log", id, tabindex: "0" });
  into.append(pre);
  const add = (text, cls) => {
    const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.append(h("span", { class: cls }, text + "\n"));
    while (pre.childNodes.length > 2000) pre.firstChild.remove();
    if (atEnd) pre.scrollTop = pre.scrollHeight;
  };
  (async () => {
    try {
      await follow(path, signal, (l) => {
        if (l.notice) add(`[${l.replica}] ${l.notice}`, "notice");
        else add(`${l.replica} | ${l.line ?? ""}`, l.stream === "stderr" ? "stderr" : "");
      });
      add("(stream ended)", "notice");
    } catch (e) {
      if (!signal.aborted) add(`(log unavailable: ${e.message})`, "stderr");
    }
  })();
}

function servicePage(name) {
  let svc = null;
  // Set once the page's log box exists (below); the builds table calls it.
  let buildLog = () => {};
  return page(`Service ${name}`, async () => {
    const [info, releases, builds] = await Promise.all([
      api("GET", `/v1/services/${enc(name)}`),
      api("GET", `/v1/services/${enc(name)}/releases`),
      api("GET", `/v1/builds?service=${enc(name)}&limit=10`)]);
    svc = info;
    const r = info.rollout;
    return h("div", {},
      h("p", {}, `Image ${info.spec.image}`, info.spec.port ? ` · port ${info.spec.port}` : "",
        ` · release ${info.current_release ?? "–"} · `,
        h("b", { id: "replica-count", "data-count": info.replicas.length }, `${info.replicas.length} replicas`),
        ` (${healthyCount(info)} healthy, ${info.spec.replicas} desired)`),
      info.secret_names.length ? h("p", { class: "muted" }, `Secrets (write-only): ${info.secret_names.join(", ")}`) : null,
      h("h2", {}, "Replicas"),
      h("section", { class: "card" }, replicaTable(info.replicas)),
      r ? h("h2", {}, `Rollout of release ${r.release}: ${rolloutProgress(r)}`) : null,
      r ? h("section", { class: "card" }, r.reason ? h("p", { class: "bad" }, r.reason) : null, table(
        ["Slot", "New", "Old", "Node", "Stage"],
        r.steps.map((s) => h("tr", {}, h("td", {}, s.slot), h("td", {}, s.new_replica || "–"),
          h("td", {}, s.old_replica || "–"), h("td", {}, s.node || "–"), h("td", {}, s.stage))))) : null,
      h("h2", {}, "Releases"),
      h("section", { class: "card" }, table(
        ["#", "Image", "State", "Created", "By", "Reason"],
        releases.map((x) => h("tr", {},
          h("td", { class: "num" }, x.number), h("td", {}, x.spec.image), h("td", {}, pill(x.state)),
          h("td", {}, when(x.created_at)), h("td", {}, x.created_by), h("td", {}, x.reason || ""))))),
      h("h2", {}, "Builds"),
      h("section", { class: "card" }, table(
        ["Build", "State", "Node", "Created", "Image", "Error", ""],
        builds.map((b) => h("tr", {},
          h("td", { class: "num" }, b.id), h("td", {}, pill(b.state)), h("td", {}, b.node || "–"),
          h("td", {}, when(b.created_at)), h("td", {}, b.image || "–"), h("td", { class: "bad" }, b.error || ""),
          h("td", {}, h("button", { type: "button", class: "quiet", onclick: () => buildLog(b.id) }, "Log")))),
        "No builds.")));
  }, (extra, signal, refresh) => {
    extra.append(h("h2", {}, "Actions"), actions(name, () => svc, refresh),
      h("h2", {}, "Live log"));
    logPane(extra, signal, `/v1/services/${enc(name)}/logs?follow=true&tail=200`, "service-log");
    const buildBox = h("div", { id: "build-log" });
    extra.append(buildBox);
    // One build log at a time: the one shown before is let go (a browser
    // keeps only 6 connections to a host over HTTP/1.1).
    let shown = null;
    signal.addEventListener("abort", () => shown?.abort());
    buildLog = (id) => {
      shown?.abort();
      shown = new AbortController();
      const mine = shown.signal;
      buildBox.replaceChildren(h("h2", {}, `Build ${id} log`));
      const pre = h("pre", { class: "log" });
      buildBox.append(pre);
      follow(`/v1/builds/${id}/logs?follow=true`, mine, (l) => pre.append(l + "\n"), false)
        .catch((e) => { if (!mine.aborted) pre.append(`(log unavailable: ${e.message})\n`); });
    };
  });
}
function actions(name, svc, refresh) {
  const done = (what) => async (p) => { await p; flash(`${what}: accepted`); refresh(); };
  const deploy = onSubmit(h("form", { class: "inline", id: "deploy-form" },
    h("label", {}, "New image", h("input", { name: "image", size: 40, required: true })),
    h("button", { type: "submit" }, "Deploy"), errorSlot("image"), errorSlot("_form")),
  (d) => done("Deploy")(api("POST", "/v1/services", { ...svc().spec, image: d.get("image").trim() })));
  const scale = onSubmit(h("form", { class: "inline", id: "scale-form" },
    h("label", {}, "Replicas", h("input", { name: "replicas", type: "number", min: 0, max: 100, required: true })),
    h("button", { type: "submit" }, "Scale"), errorSlot("replicas"), errorSlot("_form")),
  (d) => done("Scale")(api("POST", `/v1/services/${enc(name)}/scale`, { replicas: Number(d.get("replicas")) })));
  const rollback = onSubmit(h("form", { class: "inline", id: "rollback-form" },
    h("label", {}, "To release (empty: the one before)", h("input", { name: "to", type: "number", min: 1 })),
    h("button", { type: "submit" }, "Roll back"), errorSlot("to"), errorSlot("_form")),
  (d) => done("Roll back")(api("POST", `/v1/services/${enc(name)}/rollback`,
    d.get("to") ? { to: Number(d.get("to")) } : {})));
  const restart = onSubmit(h("form", { class: "inline", id: "restart-form" },
    h("button", { type: "submit" }, "Restart (rolling)"), errorSlot("_form")),
  () => done("Restart")(api("POST", `/v1/services/${enc(name)}/restart`)));
  return h("div", { class: "actions" }, deploy, scale, rollback, restart, h("p", { id: "flash", class: "ok" }));
}

function flash(text) {
  const el = document.getElementById("flash");
  if (el) el.textContent = text;
}

function nodePage(name) {
  return page(`Node ${name}`, async () => {
    const [nodes, services] = await Promise.all([api("GET", "/v1/nodes"), api("GET", "/v1/services")]);
    const n = nodes.find((x) => x.name === name);
    if (!n) return h("p", { class: "notice bad" }, `No node named ${name}.`);
    const replicas = services.flatMap((s) => s.replicas).filter((r) => r.node === name);
    const upgrade = n.target_version && n.target_version !== n.agent_version
      ? `upgrading to ${n.target_version}` : "up to date";
    return h("div", {},
      h("section", { class: "card" }, table(["Role", "State", "Version", "Upgrade", "Mesh IP", "Subnet", "Last seen",
        "Revision", "CPU", "Memory"], [h("tr", {},
        h("td", {}, n.role), h("td", {}, pill(n.online ? "online" : "offline")), h("td", {}, n.agent_version || "–"),
        h("td", { id: "upgrade-state" }, upgrade), h("td", {}, n.mesh_ip), h("td", {}, n.subnet),
        h("td", {}, when(n.last_seen)), h("td", { class: "num" }, `${n.applied_revision} / ${n.revision}`),
        h("td", {}, n.usage ? `${cpu(n.usage.cpu_millicores)} of ${n.usage.cores}` : "–"),
        h("td", {}, n.usage ? `${bytes(n.usage.memory_used_bytes)} of ${bytes(n.usage.memory_total_bytes)}` : "–"))]),
      n.error ? h("p", { class: "bad" }, n.error) : null),
      h("h2", {}, "Peers"),
      h("section", { class: "card" },
        h("p", { id: "peers-up" }, n.peers_up === null || n.peers_up === undefined
          ? "Not reported yet."
          : `${n.peers_up} up (a handshake within the last 3 minutes)`),
        table(["Peer down", "Last handshake"],
          n.peers.map((p) => h("tr", {}, h("td", {}, h("a", { href: `#/nodes/${enc(p.name)}` }, p.name)),
            h("td", {}, ago(p.handshake_age_secs)))), "None down.")),
      h("h2", {}, "Replicas"),
      h("section", { class: "card" }, replicaTable(replicas, false)));
  }, (extra, signal) => {
    extra.append(h("h2", {}, "Agent log"));
    logPane(extra, signal, `/v1/nodes/${enc(name)}/logs?follow=true&tail=200`, "agent-log");
  });
}

function eventsPage() {
  const rows = h("tbody", { id: "events" });
  const add = (e) => {
    rows.prepend(h("tr", { "data-kind": e.kind },
      h("td", {}, new Date(e.at_ms).toISOString().replace("T", " ").slice(0, 23)),
      h("td", {}, e.kind), h("td", {}, e.service || ""), h("td", {}, e.node || ""), h("td", {}, e.message)));
    while (rows.childNodes.length > 500) rows.lastChild.remove();
  };
  const p = page("Events", async () => h("span", {}), (extra, signal) => {
    extra.append(h("section", { class: "card" }, h("table", {},
      h("thead", {}, h("tr", {}, ["Time (UTC)", "Kind", "Service", "Node", "What"].map((x) => h("th", {}, x)))), rows)));
    follow("/v1/events?follow=true&tail=100", signal, add)
      .catch((e) => { if (!signal.aborted) extra.prepend(h("p", { class: "notice bad" }, e.message)); });
  });
  return p;
}

function tokensPage() {
  return page("Join tokens", async () => {
    const tokens = await api("GET", "/v1/tokens");
    return h("section", { class: "card" }, table(["Token", "Role", "State", "Created", "Expires", "Used by", ""],
      tokens.map((t) => h("tr", {},
        h("td", {}, t.id), h("td", {}, t.role), h("td", {}, pill(t.state)), h("td", {}, when(t.created_at)),
        h("td", {}, when(t.expires_at)), h("td", {}, t.used_by || ""),
        h("td", {}, t.state === "valid" ? h("button", { type: "button", class: "quiet", onclick: async (ev) => {
          try {
            await api("DELETE", `/v1/tokens/${enc(t.id)}`);
            current?.refresh();
          } catch (e) {
            ev.target.replaceWith(h("span", { class: "bad" }, e.message));
          }
        } }, "Revoke") : null))), "No tokens."));
  }, (extra, _signal, refresh) => {
    const out = h("div", { id: "new-token" });
    const form = onSubmit(h("form", { class: "inline", id: "token-form" },
      h("label", {}, "Role", h("select", { name: "role" },
        h("option", { value: "worker" }, "worker"), h("option", { value: "proxy" }, "proxy"))),
      h("label", {}, "Valid for (hours)", h("input", { name: "ttl_secs", type: "number", min: 1, max: 720, value: 24 })),
      h("button", { type: "submit" }, "Create join token"), errorSlot("ttl_secs"), errorSlot("_form")),
    async (d) => {
      const t = await api("POST", "/v1/tokens", { proxy: d.get("role") === "proxy", ttl_secs: Number(d.get("ttl_secs")) * 3600 });
      const line = h("code", { class: "copy", id: "setup-command" }, t.setup_command);
      out.replaceChildren(
        h("p", {}, `Token ${t.id} (${t.role}), valid until ${when(t.expires_at)}. Run on the new server:`), line,
        h("button", { type: "button", onclick: async (ev) => {
          await navigator.clipboard.writeText(t.setup_command);
          ev.target.textContent = "Copied";
        } }, "Copy"),
        h("p", { class: "muted" }, "Or start the agent by hand: ", h("code", {}, t.agent_command)));
      refresh();
    });
    extra.append(h("section", { class: "card" }, form, out), h("h2", {}, "Tokens"));
  }, { extraFirst: true });
}

// key=value lines into a map; a bad line is an error on `field`.
function pairs(text, field) {
  const out = {};
  text.split("\n").map((l) => l.trim()).filter((l) => l && !l.startsWith("#")).forEach((l, i) => {
    const eq = l.indexOf("=");
    if (eq < 1) throw Object.assign(new Error(`${field}: line ${i + 1} is not KEY=VALUE`), { field });
    out[l.slice(0, eq).trim()] = l.slice(eq + 1);
  });
  return out;
}

function launchPage() {
  const abort = new AbortController();
  const status = h("div", { id: "launch-status" });
  const field = (label, name, attrs = {}) => [
    h("label", { for: `launch-${name}` }, label),
    attrs.textarea ? h("textarea", { id: `launch-${name}`, name, placeholder: attrs.placeholder })
      : h("input", { id: `launch-${name}`, name, ...attrs }),
    errorSlot(name)];
  const form = onSubmit(h("form", { class: "stack", id: "launch-form" },
    field("Name", "name", { required: true, placeholder: "web" }),
    field("Image", "image", { required: true, placeholder: "registry:5000/web:1" }),
    field("Port (inside the container)", "port", { type: "number", min: 1, max: 65535 }),
    field("Replicas", "replicas", { type: "number", min: 0, max: 100, value: 1 }),
    field("Command (optional, shell form; empty: the image's own)", "command", {}),
    field("Environment (KEY=VALUE per line)", "env", { textarea: true }),
    field("Secrets (KEY=VALUE per line; write-only, never shown again)", "secrets", { textarea: true }),
    field("Domain (optional; needs a port)", "domain", { placeholder: "app.example.com" }),
    errorSlot("_form"),
    h("button", { type: "submit" }, "Launch")),
  async (d) => {
    const spec = {
      name: d.get("name").trim(), image: d.get("image").trim(),
      replicas: Number(d.get("replicas") || 1),
      env: pairs(d.get("env"), "env"), secrets: pairs(d.get("secrets"), "secrets"),
    };
    if (d.get("port")) spec.port = Number(d.get("port"));
    if (d.get("command").trim()) spec.command = d.get("command").trim();
    const domain = d.get("domain").trim();
    if (domain && !spec.port) throw Object.assign(new Error("port: a domain needs the service's port"), { field: "port" });
    // A launch makes a new service; it never replaces one.
    const taken = await api("GET", `/v1/services/${enc(spec.name)}`).then(() => true, (e) => {
      if (e instanceof ApiFailure && e.status === 404) return false;
      throw e;
    });
    if (taken) {
      throw Object.assign(new Error(`name: a service named ${spec.name} exists already (deploy to it from its page)`),
        { field: "name" });
    }
    const info = await api("POST", "/v1/services", spec);
    if (domain) {
      try {
        await api("POST", "/v1/domains", { domain, service: spec.name, port: spec.port });
      } catch (e) {
        if (e.field === "service" || e.field === "port") throw e;
        throw Object.assign(e, { field: "domain" });
      }
    }
    // Write-only: the values leave the page once sent.
    form.querySelector('[name="secrets"]').value = "";
    watchLaunch(spec.name, info.rollout?.release ?? info.current_release, domain, status, abort.signal);
  });
  const root = h("div", {}, h("h1", {}, "Launch a service"), h("section", { class: "card" }, form), status);
  return { root, refresh: () => {}, stop: () => abort.abort() };
}

// Follows a new service through its stages until it serves (or fails).
async function watchLaunch(name, release, domain, into, signal) {
  const stages = [
    ["placed", "Replicas placed on nodes"],
    ["running", "Replicas running"],
    ["healthy", "Replicas healthy"],
    ["rolled", "Release rolled out"],
    ...(domain ? [["cert", "Certificate issued"], ["routed", "Served by every proxy"]] : []),
  ];
  const list = h("ol", { class: "stages" }, stages.map(([k, t]) => h("li", { "data-stage": k }, t)));
  const verdict = h("p", { id: "launch-verdict", "data-state": "waiting" }, "Waiting…");
  const why = h("div", { class: "bad", id: "launch-why" });
  into.replaceChildren(h("section", { class: "card" },
    h("h2", {}, `${name}: release ${release ?? ""}`), list, verdict, why,
    h("p", {}, h("a", { href: `#/services/${enc(name)}` }, "Open the service page"))));
  const mark = (k, ok) => list.querySelector(`[data-stage="${k}"]`).classList.toggle("done", ok);
  while (!signal.aborted) {
    try {
      const s = await api("GET", `/v1/services/${enc(name)}`);
      const d = domain ? await api("GET", `/v1/domains/${enc(domain)}`) : null;
      const want = s.spec.replicas;
      const reps = s.replicas.filter((r) => r.release === release);
      const placed = reps.length >= want && reps.every((r) => r.node);
      const running = placed && reps.filter((r) => r.state === "running").length >= want;
      const healthy = running && healthyCount({ replicas: reps }) >= want;
      const rolled = !s.rollout || s.rollout.state === "complete";
      mark("placed", placed); mark("running", running); mark("healthy", healthy); mark("rolled", rolled);
      const problems = s.replicas.filter((r) => r.error).map((r) => `${r.replica}: ${r.error}`);
      if (s.rollout?.reason) problems.push(s.rollout.reason);
      if (d?.last_error) problems.push(`${domain}: ${d.last_error}`);
      why.replaceChildren(...problems.map((p) => h("div", {}, p)));
      let serving = healthy && rolled;
      if (d) {
        const cert = d.cert_state === "valid" || d.cert_state === "passthrough";
        mark("cert", cert);
        mark("routed", cert && d.proxies_online > 0 && d.proxies_serving >= d.proxies_online);
        serving = serving && cert && d.proxies_online > 0 && d.proxies_serving >= d.proxies_online;
      }
      const failed = s.rollout && ["failed", "rolled-back"].includes(s.rollout.state);
      if (serving) { verdict.textContent = "serving"; verdict.dataset.state = "serving"; verdict.className = "ok"; return; }
      if (failed) { verdict.textContent = "failed"; verdict.dataset.state = "failed"; verdict.className = "bad"; return; }
      verdict.textContent = "Waiting…";
    } catch (e) {
      if (e instanceof ApiFailure && e.status === 401) return;
      why.textContent = e.message;
    }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

// ---- routing --------------------------------------------------------------

function route() {
  if (!csrf) return;
  if (current) current.stop();
  let parts = [];
  try {
    parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  } catch { /* a malformed link: the overview */ }
  const [what, name] = parts;
  current = what === "services" && name ? servicePage(name)
    : what === "nodes" && name ? nodePage(name)
      : what === "events" ? eventsPage()
        : what === "tokens" ? tokensPage()
          : what === "launch" ? launchPage()
            : overview();
  document.querySelectorAll("[data-nav]").forEach((a) => {
    a.classList.toggle("active", a.dataset.nav === (what || "overview"));
  });
  view.replaceChildren(current.root);
  current.refresh();
  startLive();
}

window.addEventListener("hashchange", route);

(async () => {
  try {
    started(await api("GET", "/v1/session"));
  } catch {
    showLogin();
  }
})();

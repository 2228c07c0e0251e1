// The dashboard in a real browser: Debian's headless Chromium, driven by
// playwright-core, against a lab's control plane that tests/tests/dashboard.rs
// brought up (it passes what is needed in the environment). Each step
// saves a screenshot into BERTH_SHOTS.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { chromium } from "playwright-core";

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set (tests/tests/dashboard.rs sets it)`);
  return v;
};
const URL = env("BERTH_URL");
const USER = env("BERTH_USER");
const PASSWORD = env("BERTH_PASSWORD");
const DEMO = env("BERTH_DEMO_SERVICE");
const TICKER = env("BERTH_TICKER_SERVICE");
const IMAGE = env("BERTH_IMAGE");
const NODES = env("BERTH_NODES").split(",");
const SHOTS = env("BERTH_SHOTS");
const WAIT = 60_000;

let browser;
let page;

before(async () => {
  mkdirSync(SHOTS, { recursive: true });
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    // As root, without a sandbox; and no background traffic to Google's
    // hosts, which this machine's closed network refuses.
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  // The lab's control plane has a certificate from its own CA.
  const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1400, height: 1000 } });
  page = await context.newPage();
  page.on("pageerror", (e) => console.error("page error:", e.message));
});

after(async () => {
  await browser?.close();
});

const shot = (name) => page.screenshot({ path: `${SHOTS}/${name}.png`, fullPage: true });

// A request from inside the page (its cookies, its origin).
const inPage = (method, path, headers = {}, body) => page.evaluate(
  async ([method, path, headers, body]) => {
    const r = await fetch(path, { method, headers, body, credentials: "same-origin" });
    let json = null;
    try { json = await r.json(); } catch { /* no body */ }
    return { status: r.status, body: json };
  },
  [method, path, headers, body]);

async function signIn(user, password) {
  await page.fill("#login-user", user);
  await page.fill("#login-password", password);
  await page.click("#login-form button[type=submit]");
}

test("a wrong password is refused, next to the credentials", async () => {
  await page.goto(URL);
  await page.waitForSelector("#login-form");
  await signIn(USER, "not-the-password");
  const error = page.locator('[data-error-for="credentials"]');
  await error.waitFor({ state: "visible", timeout: WAIT });
  assert.match(await error.textContent(), /\S/, "an error message is shown");
  assert.equal(await page.locator("#top").isHidden(), true, "still signed out");
  await shot("01-wrong-password");
});

test("signing in shows the lab's nodes and the demo service", async () => {
  await signIn(USER, PASSWORD);
  for (const n of NODES) {
    await page.waitForSelector(`tr[data-node="${n}"]`, { timeout: WAIT });
  }
  await page.waitForSelector(`tr[data-service="${DEMO}"]`, { timeout: WAIT });
  assert.equal(await page.locator("#who").textContent(), USER);
  await shot("02-overview");
});

test("scaling the demo from its page changes the replica count", async () => {
  await page.click(`tr[data-service="${DEMO}"] a`);
  const count = page.locator("#replica-count");
  await count.waitFor({ timeout: WAIT });
  const before = Number(await count.getAttribute("data-count"));
  await page.fill("#scale-form input[name=replicas]", String(before + 1));
  await page.click("#scale-form button[type=submit]");
  await page.waitForFunction(
    (n) => document.querySelector("#replica-count")?.dataset.count === String(n), before + 1, { timeout: WAIT });
  await shot("03-scaled");
});

test("a new log line arrives without a reload", async () => {
  await page.goto(`${URL}/#/services/${TICKER}`);
  // Marks this document: a reload would lose the mark.
  await page.evaluate(() => { window.berthMark = "same page"; });
  await page.waitForFunction(() => /tick-\d+/.test(document.querySelector("#service-log")?.textContent || ""),
    null, { timeout: WAIT });
  const last = () => page.evaluate(() => {
    const all = (document.querySelector("#service-log").textContent.match(/tick-\d+/g) || []);
    return all[all.length - 1];
  });
  const first = await last();
  await page.waitForFunction((seen) => {
    const all = (document.querySelector("#service-log").textContent.match(/tick-\d+/g) || []);
    return all.length && all[all.length - 1] !== seen;
  }, first, { timeout: WAIT });
  assert.equal(await page.evaluate(() => window.berthMark), "same page", "the page was not reloaded");
  await shot("04-live-log");
});

test("the launch form deploys a service and follows it until it serves", async () => {
  await page.click('a[data-nav="launch"]');
  await page.waitForSelector("#launch-form");
  // A bad name first: the API's error shows next to its field.
  await page.fill("#launch-name", "Bad Name");
  await page.fill("#launch-image", IMAGE);
  await page.click("#launch-form button[type=submit]");
  const nameError = page.locator('[data-error-for="name"]');
  await nameError.waitFor({ state: "visible", timeout: WAIT });
  assert.match(await nameError.textContent(), /name/);
  await shot("05-launch-field-error");

  await page.fill("#launch-name", "launched");
  await page.fill("#launch-port", "8080");
  await page.fill("#launch-replicas", "1");
  await page.fill("#launch-env", "GREETING=hello");
  await page.fill("#launch-secrets", "API_KEY=s3cret");
  await page.click("#launch-form button[type=submit]");
  await page.waitForSelector('#launch-verdict[data-state="serving"]', { timeout: 120_000 });
  assert.equal(await page.inputValue("#launch-secrets"), "", "the secret's value left the page once sent");
  assert.match(await page.locator("#launch-status h2").textContent(), /release 1$/);
  await shot("06-launched-serving");
  // Secrets are write-only: the service page names them, never their values.
  await page.goto(`${URL}/#/services/launched`);
  await page.waitForSelector("#replica-count", { timeout: WAIT });
  const text = await page.locator("main").textContent();
  assert.match(text, /API_KEY/);
  assert.doesNotMatch(text, /s3cret/);
});

test("a join token comes with its setup line", async () => {
  await page.click('a[data-nav="tokens"]');
  await page.waitForSelector("#token-form");
  await page.click("#token-form button[type=submit]");
  const line = page.locator("#setup-command");
  await line.waitFor({ timeout: WAIT });
  const text = await line.textContent();
  assert.match(text, /^curl .*\/setup\.sh \| sudo bash -s -- --token berth1\./);
  await shot("07-join-token");
});

test("a node's page shows its peers and its agent's own log", async () => {
  const [node] = NODES;
  await page.goto(`${URL}/#/nodes/${node}`);
  // Its peers up are counted (the ones down would be listed by name).
  await page.waitForFunction(() => /^[1-9]\d* up/.test(document.querySelector("#peers-up")?.textContent || ""),
    null, { timeout: WAIT });
  await page.waitForFunction(() => /\S/.test(document.querySelector("#agent-log")?.textContent || ""),
    null, { timeout: WAIT });
  assert.match(await page.locator("#upgrade-state").textContent(), /up to date|upgrading/);
  await shot("08-node");
});

test("the events page shows new events as they happen", async () => {
  await page.click('a[data-nav="events"]');
  await page.waitForSelector('#events tr[data-kind="deploy"]', { timeout: WAIT });
  await page.evaluate(() => { window.berthMark = "events page"; });
  // A restart from elsewhere (this page's own session, outside the UI).
  const session = await inPage("GET", "/v1/session");
  const r = await inPage("POST", `/v1/services/${TICKER}/restart`, { "x-csrf-token": session.body.csrf });
  assert.equal(r.status, 200, JSON.stringify(r.body));
  await page.waitForFunction((svc) => [...document.querySelectorAll('#events tr[data-kind="deploy"]')]
    .some((tr) => tr.textContent.includes(svc) && tr.textContent.includes("restart")), TICKER, { timeout: WAIT });
  assert.equal(await page.evaluate(() => window.berthMark), "events page", "the page was not reloaded");
  await shot("09-events");
});

test("the API refuses a cookie request without the CSRF token", async () => {
  const without = await inPage("POST", `/v1/services/${DEMO}/scale`, { "content-type": "application/json" },
    JSON.stringify({ replicas: 1 }));
  assert.equal(without.status, 403);
  assert.equal(without.body.code, "csrf_required");
});

test("after signing out no page or API call works", async () => {
  await page.click("#logout");
  await page.waitForSelector("#login-form", { timeout: WAIT });
  const list = await inPage("GET", "/v1/services");
  assert.equal(list.status, 401);
  await page.goto(`${URL}/#/services/${DEMO}`);
  await page.waitForSelector("#login-form", { timeout: WAIT });
  assert.equal(await page.locator("#replica-count").count(), 0);
  await shot("10-signed-out");
});

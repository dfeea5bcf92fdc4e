// The playground in a real browser (Debian's chromium driven by playwright-core), run by
// crates/kiln/tests/service/playground.rs against real kiln processes. Controls are found by
// their accessible names, as a person (or a screen reader) finds them.
//
// Environment: CHROMIUM (the browser), KILN_URL and KILN_KEY (a kiln that generates),
// KILN_QUEUE_URL and KILN_QUEUE_KEY (an API node without workers: its requests stay queued),
// KILN_EDIT_URL and KILN_EDIT_KEY (a kiln serving the FLUX.2 routes, edit among them), OUT_DIR
// (screenshots) and PNG_FILE (an image to upload). Exits non-zero on the first failed check, naming it.

import { chromium } from "playwright-core";
import assert from "node:assert/strict";
import path from "node:path";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const [URL_, KEY, QUEUE_URL, QUEUE_KEY, EDIT_URL, EDIT_KEY, OUT, PNG_FILE] = [
  "KILN_URL", "KILN_KEY", "KILN_QUEUE_URL", "KILN_QUEUE_KEY", "KILN_EDIT_URL", "KILN_EDIT_KEY",
  "OUT_DIR", "PNG_FILE",
].map(env);
const FLEX = "blackforestlabs/flux-2/flex/text-to-image";
const EDIT = "blackforestlabs/flux-2/flex/edit";
const TIMEOUT = 120_000;
/** A prompt that would run script if the page ever rendered it as HTML. */
const HOSTILE_PROMPT = `<img src=x onerror="window.__injected=1"> a kiln at dusk <b>bold</b>`;

const browser = await chromium.launch({
  executablePath: env("CHROMIUM"),
  args: ["--no-sandbox", "--disable-gpu"],
});
/** Console errors, page errors, CSP violations and off-origin requests, per page. */
const problems = [];

async function openPage(base, options = {}) {
  const context = await browser.newContext({
    viewport: { width: 1280, height: 900 },
    acceptDownloads: true,
    ...options,
  });
  await context.grantPermissions(["clipboard-read", "clipboard-write"], { origin: base });
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  page.on("console", (message) => {
    if (message.type() === "error") problems.push({ kind: "console", text: message.text() });
  });
  page.on("pageerror", (error) => problems.push({ kind: "pageerror", text: String(error) }));
  page.on("request", (request) => {
    const url = request.url();
    if (!url.startsWith(base) && !url.startsWith("data:") && !url.startsWith("blob:")) {
      problems.push({ kind: "third-party request", text: url });
    }
  });
  await page.addInitScript(() => {
    document.addEventListener("securitypolicyviolation", (event) => {
      console.error(`CSP violation: ${event.violatedDirective} ${event.blockedURI}`);
    });
  });
  await page.goto(base);
  await page.getByLabel("Model").locator("option").first().waitFor({ state: "attached" });
  return { context, page };
}

/** Every text the live region showed, in order (installed before anything is submitted). */
async function recordStatusTexts(page) {
  await page.evaluate(() => {
    window.__statusTexts = [];
    const region = document.getElementById("progress-text");
    new MutationObserver(() => window.__statusTexts.push(region.textContent)).observe(region, {
      childList: true, characterData: true, subtree: true,
    });
  });
}

async function saveKey(page, key) {
  await page.getByLabel("API key").fill(key);
  await page.getByRole("button", { name: "Save key" }).click();
}

async function check(name, body) {
  try {
    await body();
    console.log(`ok - ${name}`);
  } catch (error) {
    console.log(`not ok - ${name}`);
    console.log(error.stack ?? String(error));
    await browser.close();
    process.exit(1);
  }
}

const { page } = await openPage(URL_);

await check("the page is served with a strict content security policy", async () => {
  const response = await page.request.get(URL_);
  const policy = response.headers()["content-security-policy"];
  assert.match(policy, /script-src 'self'/);
  assert.doesNotMatch(policy, /unsafe-inline|unsafe-eval/);
});

await check("every control has an accessible name", async () => {
  const unnamed = await page.evaluate(() =>
    [...document.querySelectorAll("input, select, textarea, button")]
      .filter((e) => !e.closest("[hidden]") && e.type !== "hidden")
      .filter((e) => !(e.labels?.length || e.getAttribute("aria-label") || e.textContent.trim()))
      .map((e) => e.outerHTML),
  );
  assert.deepEqual(unnamed, []);
});

await check("a refused key is explained", async () => {
  await saveKey(page, "kiln_not-a-real-key");
  await page.getByRole("button", { name: "Generate" }).click();
  await page.getByRole("alert").filter({ hasText: "401" }).waitFor();
});

await check("submit shows queue and progress, then the image and its metadata", async () => {
  await saveKey(page, KEY);
  await page.getByLabel("Model").selectOption(FLEX);
  await page.getByLabel("Image Size").waitFor(); // the form is rebuilt for the model chosen
  await page.getByLabel("Prompt", { exact: true }).fill(HOSTILE_PROMPT);
  await page.getByLabel("Image Size").selectOption("Custom");
  await page.getByLabel("Width", { exact: true }).fill("512");
  await page.getByLabel("Height", { exact: true }).fill("512");
  // Progress is reported at the first step, then about once a second: a short run (50 steps of
  // the tiny FLUX.2 fixture take under a second on a fast CPU) still shows a step.
  await page.getByLabel("Number of Inference Steps", { exact: true }).fill("50");
  await page.getByLabel("Seed").fill("1234");
  await page.getByRole("switch", { name: "Magic Prompt" }).uncheck();
  await recordStatusTexts(page);
  await page.getByRole("button", { name: "Generate" }).click();
  const image = page.getByRole("img", { name: /^Generated image/ });
  await image.waitFor({ state: "visible" });
  const loaded = await image.evaluate((img) => img.complete && img.naturalWidth);
  assert.equal(loaded, 512, "the result image loads at its size");
  const texts = await page.evaluate(() => window.__statusTexts);
  assert.ok(texts.some((t) => /step \d+ of \d+/.test(t)), `progress shown: ${texts.join(" | ")}`);
  const metadata = await page.locator("#metadata").innerText();
  assert.match(metadata, /Seed\s+1234/);
  assert.match(metadata, /512 × 512/);
  assert.ok(metadata.includes(HOSTILE_PROMPT), "the prompt is shown as text");
  const injected = await page.evaluate(() => window.__injected ?? document.querySelector("img[src='x'], b"));
  assert.equal(injected, null, "no markup from the prompt reached the page");
  await page.screenshot({ path: path.join(OUT, "playground-result.png"), fullPage: true });
});

await check("the image downloads", async () => {
  const [download] = await Promise.all([
    page.waitForEvent("download"),
    page.getByRole("link", { name: "Download image" }).click(),
  ]);
  assert.match(download.suggestedFilename(), /\.(jpg|png|webp)$/);
});

await check("copy as curl and as Python give runnable requests without the key", async () => {
  await page.getByText("Use this request from code").click();
  await page.getByRole("button", { name: "Copy as curl" }).click();
  const curl = await page.evaluate(() => navigator.clipboard.readText());
  assert.match(curl, new RegExp(`curl --request POST \\\\\\n  --url ${URL_}/v1/models/${FLEX}`));
  assert.ok(curl.includes('"seed": 1234'));
  await page.getByRole("button", { name: "Copy as Python" }).click();
  const python = await page.evaluate(() => navigator.clipboard.readText());
  assert.match(python, /requests\.post\(f"\{BASE_URL\}\/v1\/models\//);
  assert.ok(!curl.includes(KEY) && !python.includes(KEY), "the key stays out of samples");
});

await check("an out-of-range number is flagged at its field", async () => {
  const width = page.getByLabel("Width", { exact: true });
  await width.fill("5000");
  await page.getByRole("button", { name: "Generate" }).click();
  await page.waitForFunction(() => document.activeElement?.getAttribute("aria-invalid") === "true");
  assert.equal(await width.getAttribute("aria-invalid"), "true");
  const description = await width.evaluate((input) =>
    input.getAttribute("aria-describedby").split(" ").map((id) => document.getElementById(id).textContent).join(" "),
  );
  assert.match(description, /between 64 and 2048/, `the rule is named beside the field: ${description}`);
  await width.fill("512");
});

await check("the gallery survives a reload and puts inputs back", async () => {
  await page.reload();
  const card = page.getByRole("listitem").filter({ hasText: "a kiln at dusk" }).first();
  await card.waitFor();
  await page.getByLabel("Prompt", { exact: true }).fill("something else");
  await card.getByRole("button", { name: "Use these inputs" }).click();
  await page.waitForFunction((p) => document.getElementById("field-prompt")?.value === p, HOSTILE_PROMPT);
  assert.equal(await page.getByLabel("Seed").inputValue(), "1234");
  // 512x512 is a preset's size ("square"), which the listing names instead of Custom sides.
  const size = await page.getByLabel("Image Size").inputValue();
  const width = await page.getByLabel("Width", { exact: true }).inputValue();
  assert.ok(size === "square" || (size === "Custom" && width === "512"), `${size} ${width}`);
});

await check("a queued request can be cancelled", async () => {
  const queued = await openPage(QUEUE_URL);
  await saveKey(queued.page, QUEUE_KEY);
  await recordStatusTexts(queued.page);
  await queued.page.getByRole("button", { name: "Generate" }).click();
  await queued.page.getByRole("status").filter({ hasText: "In queue" }).waitFor();
  await queued.page.getByRole("button", { name: "Cancel request" }).click();
  await queued.page.getByRole("status").filter({ hasText: "Ended: cancelled." }).waitFor();
  await queued.context.close();
});

await check("the edit route takes an uploaded file as a data URI", async () => {
  const edit = await openPage(EDIT_URL);
  await saveKey(edit.page, EDIT_KEY);
  await edit.page.getByLabel("Model").selectOption(EDIT);
  await edit.page.getByLabel("Image URLs").setInputFiles(PNG_FILE);
  const url = edit.page.getByLabel("Image 1 URL");
  await edit.page.waitForFunction(() => document.querySelector("input[type=url]")?.value.startsWith("data:image/png;base64,"));
  assert.match(await url.inputValue(), /^data:image\/png;base64,/);
  await edit.page.getByLabel("Prompt", { exact: true }).fill("the same shape in red");
  await edit.page.getByLabel("Image Size").selectOption("Custom");
  await edit.page.getByLabel("Width", { exact: true }).fill("64");
  await edit.page.getByLabel("Height", { exact: true }).fill("64");
  await edit.page.getByLabel("Number of Inference Steps", { exact: true }).fill("2");
  await edit.page.getByRole("button", { name: "Generate" }).click();
  const image = edit.page.getByRole("img", { name: /^Generated image/ });
  await image.waitFor({ state: "visible" });
  assert.equal(await image.evaluate((img) => img.complete && img.naturalWidth), 64);
  await edit.context.close();
});

await check("at phone width nothing scrolls sideways, light and dark", async () => {
  for (const colorScheme of ["light", "dark"]) {
    const phone = await openPage(URL_, { viewport: { width: 390, height: 844 }, colorScheme, isMobile: true });
    await saveKey(phone.page, KEY);
    await phone.page.getByRole("listitem").first().waitFor();
    const overflow = await phone.page.evaluate(
      () => document.documentElement.scrollWidth - document.documentElement.clientWidth,
    );
    assert.equal(overflow, 0, `${colorScheme}: no sideways scrolling`);
    await phone.page.screenshot({ path: path.join(OUT, `playground-phone-${colorScheme}.png`), fullPage: true });
    await phone.context.close();
  }
});

await check("no console errors, CSP violations or third-party requests", async () => {
  // The refused key (401) and the out-of-range submit (422) were asked for; Chromium logs
  // each refused fetch as a console error. Anything else is a fault.
  const expected = /status of (401|422) /;
  const unexpected = problems.filter((p) => !(p.kind === "console" && expected.test(p.text)));
  assert.deepEqual(unexpected, []);
});

await browser.close();
console.log("all playground checks passed");

// The kiln playground: a client of kiln's public API on the page's own origin.
//
// Layout: `api` (fetch with the saved key, errors as values), `schemaForm` (a form built from a
// model's JSON schema, read back as an input object), `watch` (the status stream, or polling
// where there is none), `render*` (the output, metadata and gallery), `snippets` (curl and
// Python). Everything a user or the server wrote reaches the page as text (textContent, never
// innerHTML): a prompt cannot inject markup.

const KEY_STORAGE = "kiln.apiKey";
const $ = (id) => document.getElementById(id);

/** `el("p", {class: "note"}, "text", child)`: an element with attributes and children. */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

// ---------------------------------------------------------------- API

function savedKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

/** A kiln URL as a path on this origin: the page only talks to the server that served it. */
function local(url) {
  const parsed = new URL(url, location.origin);
  return parsed.pathname + parsed.search;
}

/**
 * Calls the API; resolves to `{ok, status, body, retryAfter}` for any HTTP answer and to
 * `{ok: false, status: 0, body: null}` when the server cannot be reached.
 */
async function api(method, path, body, signal) {
  const headers = { Accept: "application/json" };
  const key = savedKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(local(path), {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    return { ok: false, status: 0, body: null, retryAfter: null };
  }
  const text = await response.text();
  let parsed = null;
  try {
    parsed = text ? JSON.parse(text) : null;
  } catch {
    parsed = null;
  }
  const retryAfter = response.headers.get("Retry-After");
  return { ok: response.ok, status: response.status, body: parsed, retryAfter };
}

/** A failed answer in words, for the page's alert. */
function describeFailure(answer) {
  if (answer.status === 0) return "The server could not be reached. Is kiln running?";
  if (answer.status === 401) {
    return "The API key was refused (401). Enter a valid key above: `kiln keys create --name NAME` makes one.";
  }
  const message = answer.body?.error_message || `The server answered ${answer.status}.`;
  if ((answer.status === 429 || answer.status === 503) && answer.retryAfter) {
    return `${message} Try again in ${answer.retryAfter} s.`;
  }
  return message;
}

function showAlert(text) {
  const alert = $("alert");
  alert.textContent = text;
  alert.hidden = !text;
}

// ---------------------------------------------------------------- schema form

/** The fields of the current model's form: name -> {read(), write(value), wrapper, input}. */
let fields = new Map();
let currentSchema = null;

function titleOf(name, property) {
  if (property.title) return property.title;
  const words = name.replace(/_/g, " ");
  return words.charAt(0).toUpperCase() + words.slice(1);
}

/** The field's wrapper with its label, note and error line, and ids tying them to `input`. */
function fieldShell(name, property, input, control = input) {
  const id = `field-${name}`;
  input.id = id;
  input.name = name;
  const note = property.description ? el("p", { class: "note", id: `${id}-note` }, property.description) : null;
  const error = el("p", { class: "error", id: `${id}-error`, hidden: true });
  input.setAttribute("aria-describedby", [note && note.id, error.id].filter(Boolean).join(" "));
  const label = el("label", { for: id }, titleOf(name, property));
  return el("div", { class: "field", "data-field": name }, label, control, note, error);
}

function numberRange(property) {
  const min = property.minimum ?? property.exclusiveMinimum;
  const max = property.maximum ?? property.exclusiveMaximum;
  return { min, max };
}

function numberField(name, property) {
  const input = el("input", { type: "number", inputmode: property.type === "integer" ? "numeric" : "decimal" });
  const { min, max } = numberRange(property);
  const step = property.type === "integer" ? 1 : "any";
  input.step = step;
  const row = el("div", { class: "row" });
  if (name === "seed") {
    const random = el("button", { type: "button" }, "Random seed");
    random.addEventListener("click", () => {
      const value = crypto.getRandomValues(new Uint32Array(1))[0];
      input.value = String(max !== undefined ? Math.min(value, max) : value);
    });
    row.append(input, random);
  } else if (min !== undefined && max !== undefined && max - min <= 10000) {
    // A slider for bounded ranges; the number box beside it is the labelled control.
    const slider = el("input", { type: "range", min, max, step: property.type === "integer" ? 1 : (max - min) / 100, "aria-label": `${titleOf(name, property)} slider`, tabindex: -1 });
    slider.addEventListener("input", () => (input.value = slider.value));
    input.addEventListener("input", () => (slider.value = input.value));
    row.append(slider, input);
    input.sync = () => (slider.value = input.value);
  } else {
    row.append(input);
  }
  if (min !== undefined) input.min = min;
  if (max !== undefined) input.max = max;
  const wrapper = fieldShell(name, property, input, row);
  return {
    wrapper,
    input,
    read: () => (input.value.trim() === "" ? undefined : Number(input.value)),
    write: (value) => {
      input.value = value === undefined || value === null ? "" : String(value);
      input.sync?.();
    },
  };
}

function booleanField(name, property) {
  const input = el("input", { type: "checkbox", role: "switch" });
  const wrapper = fieldShell(name, property, input);
  // A switch reads best with its label beside it.
  const label = wrapper.querySelector("label");
  label.classList.add("switch");
  label.prepend(input);
  return { wrapper, input, read: () => input.checked, write: (value) => (input.checked = Boolean(value)) };
}

function textField(name, property) {
  const long = name === "prompt" || (property.maxLength ?? 0) > 200;
  const input = long ? el("textarea", { rows: 5 }) : el("input", { type: "text" });
  return {
    wrapper: fieldShell(name, property, input),
    input,
    read: () => (input.value === "" ? undefined : input.value),
    write: (value) => (input.value = value ?? ""),
  };
}

function selectField(name, property, values) {
  const input = el("select");
  for (const value of values) input.append(el("option", { value }, value));
  return {
    wrapper: fieldShell(name, property, input),
    input,
    read: () => input.value,
    write: (value) => (input.value = value ?? values[0]),
  };
}

/** FLUX.2's `image_size`: a preset name, or `{width, height}` when "Custom" is chosen. */
function sizeChoiceField(name, property, presets, custom) {
  const CUSTOM = "Custom";
  const select = selectField(name, property, [...presets, CUSTOM]);
  const sides = {};
  const box = el("div", { class: "row", hidden: true });
  for (const side of ["width", "height"]) {
    const sideProperty = { ...custom.properties[side], title: titleOf(side, {}) };
    const field = numberField(`${name}.${side}`, sideProperty);
    field.write(sideProperty.default ?? 1024);
    sides[side] = field;
    box.append(field.wrapper);
  }
  select.wrapper.append(box);
  const toggle = () => (box.hidden = select.input.value !== CUSTOM);
  select.input.addEventListener("change", toggle);
  return {
    wrapper: select.wrapper,
    input: select.input,
    sides,
    read: () => {
      if (select.input.value !== CUSTOM) return select.input.value;
      return { width: sides.width.read(), height: sides.height.read() };
    },
    write: (value) => {
      if (value && typeof value === "object") {
        select.input.value = CUSTOM;
        sides.width.write(value.width);
        sides.height.write(value.height);
      } else {
        select.write(value ?? property.default);
      }
      toggle();
    },
  };
}

/** The edit route's images: URLs typed in, or files read as data URIs. */
function imageListField(name, property) {
  const maxItems = property.maxItems ?? 4;
  const list = el("ul", { class: "images" });
  const add = el("button", { type: "button" }, "Add image URL");
  // The field's label names the upload control; typed URLs are rows with names of their own.
  const upload = el("input", { type: "file", accept: "image/*", multiple: true });
  const row = (value = "") => {
    const index = list.children.length + 1;
    const input = el("input", { type: "url", value, "aria-label": `Image ${index} URL` });
    const remove = el("button", { type: "button", "aria-label": `Remove image ${index}` }, "Remove");
    const item = el("li", {}, input, remove);
    remove.addEventListener("click", () => item.remove());
    list.append(item);
    return input;
  };
  add.addEventListener("click", () => {
    if (list.children.length < maxItems) row().focus();
  });
  upload.addEventListener("change", async () => {
    for (const file of upload.files) {
      if (list.children.length >= maxItems) break;
      row(await dataUri(file));
    }
    upload.value = "";
  });
  const controls = el("div", {}, list, el("div", { class: "actions" }, upload, add));
  const wrapper = fieldShell(name, property, upload, controls);
  return {
    wrapper,
    input: upload,
    read: () => [...list.querySelectorAll("input")].map((i) => i.value.trim()).filter(Boolean),
    write: (values) => {
      list.replaceChildren();
      for (const value of values ?? []) row(value);
    },
  };
}

function dataUri(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

/** The field for one schema property, by its kind. */
function fieldFor(name, property) {
  const choices = property.oneOf ?? property.anyOf;
  if (choices) {
    const presets = choices.find((c) => Array.isArray(c.enum));
    const custom = choices.find((c) => c.type === "object");
    if (presets && custom) return sizeChoiceField(name, property, presets.enum, custom);
  }
  if (Array.isArray(property.enum)) return selectField(name, property, property.enum);
  switch (property.type) {
    case "integer":
    case "number":
      return numberField(name, property);
    case "boolean":
      return booleanField(name, property);
    case "array":
      return imageListField(name, property);
    default:
      return textField(name, property);
  }
}

/**
 * Fields that a top-level `oneOf` allows only with one value of another field (FLUX 1.1 [pro]'s
 * `width`/`height` only with `image_size: "Custom"`): `[{field, value, dependents}]`.
 */
function conditionalFields(schema) {
  const rules = [];
  const branches = schema.oneOf ?? [];
  for (const branch of branches) {
    for (const [field, rule] of Object.entries(branch.properties ?? {})) {
      if (rule && rule.const !== undefined) {
        const dependents = branches
          .flatMap((other) => Object.entries(other.properties ?? {}))
          .filter(([, value]) => value === false)
          .map(([name]) => name);
        rules.push({ field, value: rule.const, dependents });
      }
    }
  }
  return rules;
}

/** The order fields are shown in (a schema's properties come in alphabetical order). */
const FIELD_ORDER = [
  "prompt", "image_urls", "image_size", "width", "height", "num_inference_steps",
  "guidance_scale", "seed", "output_format",
];

function buildForm(schema) {
  currentSchema = schema;
  fields = new Map();
  const container = $("fields");
  container.replaceChildren();
  const properties = schema.properties ?? {};
  const rank = (name) => {
    const at = FIELD_ORDER.indexOf(name);
    return at < 0 ? FIELD_ORDER.length : at;
  };
  const names = Object.keys(properties).sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
  for (const name of names) {
    const field = fieldFor(name, properties[name]);
    fields.set(name, field);
    container.append(field.wrapper);
  }
  for (const rule of conditionalFields(schema)) {
    const controller = fields.get(rule.field);
    if (!controller) continue;
    const update = () => {
      for (const name of rule.dependents) {
        const dependent = fields.get(name);
        if (dependent) dependent.wrapper.hidden = controller.read() !== rule.value;
      }
    };
    controller.input.addEventListener("change", update);
    controller.update = update;
  }
  fillForm({});
}

/** Puts `input` in the form, each missing field at its schema default. */
function fillForm(input) {
  const properties = currentSchema.properties ?? {};
  for (const [name, field] of fields) {
    const value = name in input ? input[name] : properties[name].default;
    field.write(value);
  }
  for (const field of fields.values()) field.update?.();
  clearFieldErrors();
}

/** The form as the model's input object: hidden and empty fields are left out. */
function readForm() {
  const input = {};
  for (const [name, field] of fields) {
    if (field.wrapper.hidden) continue;
    const value = field.read();
    if (value === undefined || (Array.isArray(value) && value.length === 0)) continue;
    input[name] = value;
  }
  return input;
}

function clearFieldErrors() {
  for (const node of document.querySelectorAll("#fields .error")) {
    node.textContent = "";
    node.hidden = true;
  }
  for (const node of document.querySelectorAll("#fields [aria-invalid]")) node.removeAttribute("aria-invalid");
}

/** The 422's `detail`, each beside its field (`image_size.width` beside the custom width). */
function showFieldErrors(detail) {
  let first = null;
  const unplaced = [];
  for (const violation of detail) {
    const path = String(violation.field ?? "");
    const [top, ...rest] = path.split(/[.[\]]/).filter(Boolean);
    const field = fields.get(top);
    let target = field;
    if (field?.sides && rest[0] in field.sides) target = field.sides[rest[0]];
    if (!target || target.wrapper.hidden) {
      unplaced.push(`${path}: ${violation.rule}`);
      continue;
    }
    const error = target.wrapper.querySelector(".error");
    error.textContent = error.textContent ? `${error.textContent} ${violation.rule}` : violation.rule;
    error.hidden = false;
    target.input.setAttribute("aria-invalid", "true");
    first ??= target.input;
  }
  first?.focus();
  return unplaced;
}

// ---------------------------------------------------------------- models

let models = [];

async function loadModels() {
  const answer = await api("GET", "/v1/models");
  if (!answer.ok) {
    showAlert(describeFailure(answer));
    return;
  }
  models = answer.body.models;
  const select = $("model");
  select.replaceChildren();
  for (const model of models) {
    const label = model.served ? model.title : `${model.title} (not served here)`;
    select.append(el("option", { value: model.id, disabled: !model.served }, label));
  }
  const first = models.find((m) => m.served);
  if (first) {
    select.value = first.id;
    await selectModel(first.id);
  }
}

async function selectModel(id, input = {}) {
  const model = models.find((m) => m.id === id);
  if (!model || !model.served) {
    showAlert(`${id} is not served by this server.`);
    return;
  }
  $("model").value = id;
  $("model-description").textContent = model ? model.id : "";
  const answer = await api("GET", model.schema_url);
  if (!answer.ok) {
    showAlert(describeFailure(answer));
    return;
  }
  buildForm(answer.body.input);
  fillForm(input);
  updateSnippet();
}

// ---------------------------------------------------------------- a request's life

/** The request being watched: {id, controller, status}. */
let active = null;

function setProgressText(text) {
  $("progress-text").textContent = text;
}

function resetOutput() {
  $("preview-figure").hidden = true;
  $("result-figure").hidden = true;
  $("metadata").hidden = true;
  $("metadata").replaceChildren();
  $("progress").hidden = true;
}

async function submit(event) {
  event.preventDefault();
  showAlert("");
  clearFieldErrors();
  if (!savedKey()) {
    showAlert("Enter and save an API key first (it is sent as a bearer token).");
    $("api-key").focus();
    return;
  }
  const model = $("model").value;
  const input = readForm();
  $("generate").disabled = true;
  const answer = await api("POST", `/v1/models/${model}`, input);
  $("generate").disabled = false;
  if (!answer.ok) {
    if (answer.status === 422 && Array.isArray(answer.body?.detail)) {
      const unplaced = showFieldErrors(answer.body.detail);
      const summary = answer.body.error_message ?? "The input does not match the model's schema.";
      showAlert([summary, ...unplaced].join(" "));
    } else {
      showAlert(describeFailure(answer));
    }
    return;
  }
  resetOutput();
  watch(answer.body.request_id);
}

async function watch(id) {
  active?.controller.abort();
  const controller = new AbortController();
  active = { id, controller, status: "in_queue" };
  $("cancel").hidden = false;
  $("cancel").disabled = false;
  setProgressText("Submitted; waiting for the first status.");
  try {
    const streamed = await followStream(id, controller.signal);
    if (!streamed) await poll(id, controller.signal);
    await finish(id);
  } catch (error) {
    if (error.name !== "AbortError") showAlert(`Lost track of the request: ${error.message}`);
  }
}

/** Reads the status stream to its end; false where the server has none (then we poll). */
async function followStream(id, signal) {
  let response;
  try {
    response = await fetch(`/v1/requests/${id}/status/stream`, {
      headers: { Authorization: `Bearer ${savedKey()}`, Accept: "text/event-stream" },
      signal,
      cache: "no-store",
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    return false;
  }
  if (!response.ok || !response.body) return false;
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let last = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = block
        .split(/\r?\n/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) {
        last = JSON.parse(data);
        showStatus(last);
      }
    }
  }
  // A stream cut before its terminal event: poll the rest.
  return last !== null && isTerminal(last.status);
}

function isTerminal(status) {
  return status === "completed" || status === "cancelled" || status === "succeeded" || status === "failed";
}

async function poll(id, signal) {
  for (;;) {
    const answer = await api("GET", `/v1/requests/${id}/status`, undefined, signal);
    if (answer.ok) {
      showStatus(answer.body);
      if (isTerminal(answer.body.status)) return;
    } else if (answer.status !== 0) {
      throw new Error(describeFailure(answer));
    }
    await new Promise((resolve, reject) => {
      const timer = setTimeout(resolve, 1000);
      signal.addEventListener("abort", () => {
        clearTimeout(timer);
        reject(new DOMException("aborted", "AbortError"));
      });
    });
  }
}

function showStatus(status) {
  if (active) active.status = status.status;
  const bar = $("progress");
  if (status.status === "in_queue") {
    const position = status.queue_position;
    const ahead = position === undefined ? "" : position === 0 ? ": next to run" : `: ${position} ahead`;
    setProgressText(`In queue${ahead}.`);
    bar.hidden = true;
  } else if (status.status === "in_progress") {
    $("cancel").textContent = "Cancel request";
    if (status.progress) {
      const { step, total } = status.progress;
      setProgressText(`Generating: step ${step} of ${total}.`);
      bar.max = total;
      bar.value = step;
    } else {
      setProgressText("Generating.");
      bar.removeAttribute("value");
    }
    bar.hidden = false;
  }
  if (status.preview_url) {
    $("preview").src = local(status.preview_url);
    $("preview-figure").hidden = false;
  }
}

async function finish(id) {
  const answer = await api("GET", `/v1/requests/${id}/result`);
  $("cancel").hidden = true;
  $("progress").hidden = true;
  $("preview-figure").hidden = true;
  active = null;
  if (!answer.ok) {
    showAlert(describeFailure(answer));
    return;
  }
  renderResult(answer.body);
  loadGallery(true);
}

async function cancel() {
  if (!active) return;
  const running = active.status === "in_progress";
  const path = `/v1/requests/${active.id}/cancel${running ? "?force=true" : ""}`;
  $("cancel").disabled = true;
  const answer = await api("POST", path);
  if (!answer.ok) {
    $("cancel").disabled = false;
    showAlert(describeFailure(answer));
    return;
  }
  const outcome = answer.body.outcome;
  if (outcome === "cancellation_requested") setProgressText("Cancelling at the next step.");
  else if (outcome === "not_cancellable") setProgressText("It can no longer be cancelled.");
  else setProgressText("Cancelled.");
}

// ---------------------------------------------------------------- rendering

function renderResult(result) {
  const metadata = $("metadata");
  metadata.replaceChildren();
  if (result.status === "succeeded" && result.output) {
    const url = local(result.output.image);
    $("result-image").src = url;
    $("result-image").alt = `Generated image: ${result.metadata?.prompt ?? ""}`;
    $("download").href = url;
    const format = result.metadata?.output_format ?? "png";
    $("download").setAttribute("download", `${result.request_id}.${format === "jpeg" ? "jpg" : format}`);
    $("result-figure").hidden = false;
    setProgressText("Done.");
  } else if (result.status === "failed") {
    setProgressText(`Failed: ${result.error?.message ?? "no reason given"}.`);
  } else {
    setProgressText(`Ended: ${result.status}.`);
  }
  const m = result.metadata;
  if (!m) return;
  const rows = [
    ["Model", m.model],
    ["Seed", m.seed],
    ["Size", `${m.width} × ${m.height}`],
    ["Steps", m.num_inference_steps],
    ["Guidance", m.guidance ?? "none"],
    ["Format", m.output_format],
    ["Time in queue", `${m.timings_ms?.queued ?? "?"} ms`],
    ["Inference time", `${m.timings_ms?.inference ?? "?"} ms`],
    ["Engine", m.engine],
    ["Prompt", m.prompt],
    ...(m.notes ?? []).map((note) => ["Note", note]),
  ];
  for (const [term, value] of rows) metadata.append(el("dt", {}, term), el("dd", {}, String(value)));
  metadata.hidden = false;
}

// ---------------------------------------------------------------- gallery

let galleryNext = null;

async function loadGallery(fresh) {
  const list = $("gallery");
  if (!savedKey()) {
    list.replaceChildren();
    $("gallery-note").textContent = "Save an API key to see the requests it made.";
    $("gallery-more").hidden = true;
    return;
  }
  const cursor = fresh ? "" : `&before=${encodeURIComponent(galleryNext)}`;
  const answer = await api("GET", `/v1/requests?limit=12${cursor}`);
  if (!answer.ok) {
    $("gallery-note").textContent = `The gallery could not be loaded: ${describeFailure(answer)}`;
    return;
  }
  if (fresh) list.replaceChildren();
  for (const request of answer.body.requests) list.append(galleryCard(request));
  galleryNext = answer.body.next ?? null;
  $("gallery-more").hidden = !galleryNext;
  $("gallery-note").textContent = list.children.length ? "" : "No requests yet with this key.";
  $("gallery-note").hidden = list.children.length > 0;
}

function galleryCard(request) {
  const prompt = request.input?.prompt ?? "";
  const image = request.output?.image
    ? el("img", { src: local(request.output.image), alt: prompt, loading: "lazy" })
    : null;
  const when = new Date(request.created_at).toLocaleString();
  const use = el("button", { type: "button" }, "Use these inputs");
  use.addEventListener("click", async () => {
    await selectModel(request.model, request.input ?? {});
    $("model-form").scrollIntoView();
    $("model").focus();
  });
  return el(
    "li",
    {},
    image,
    el("p", { class: "prompt" }, prompt),
    el("p", { class: "note" }, `${request.model} · ${request.status} · ${when}`),
    use,
  );
}

// ---------------------------------------------------------------- code samples

function pythonLiteral(value, indent = "") {
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number") return String(value);
  if (typeof value === "string") return JSON.stringify(value);
  const inner = indent + "    ";
  if (Array.isArray(value)) {
    return `[${value.map((v) => pythonLiteral(v, inner)).join(", ")}]`;
  }
  const entries = Object.entries(value).map(([k, v]) => `${inner}${JSON.stringify(k)}: ${pythonLiteral(v, inner)},`);
  return `{\n${entries.join("\n")}\n${indent}}`;
}

const snippets = {
  curl(model, input) {
    const body = JSON.stringify(input, null, 2).replace(/'/g, "'\\''");
    return [
      `curl --request POST \\`,
      `  --url ${location.origin}/v1/models/${model} \\`,
      `  --header "Content-Type: application/json" \\`,
      `  --header "Authorization: Bearer $KILN_API_KEY" \\`,
      `  --data '${body}'`,
    ].join("\n");
  },
  python(model, input) {
    return [
      "import os",
      "import time",
      "",
      "import requests",
      "",
      `BASE_URL = ${JSON.stringify(location.origin)}`,
      'HEADERS = {"Authorization": f"Bearer {os.environ[\'KILN_API_KEY\']}"}',
      "",
      `payload = ${pythonLiteral(input)}`,
      `submitted = requests.post(f"{BASE_URL}/v1/models/${model}", json=payload, headers=HEADERS)`,
      "submitted.raise_for_status()",
      "request = submitted.json()",
      "",
      'while requests.get(request["status_url"], headers=HEADERS).json()["status"] not in ("completed", "cancelled"):',
      "    time.sleep(1)",
      "",
      'result = requests.get(request["result_url"], headers=HEADERS).json()',
      'print(result["output"]["image"] if result["status"] == "succeeded" else result)',
    ].join("\n");
  },
};

let snippetKind = "curl";

function updateSnippet() {
  if (!currentSchema) return;
  $("code-sample").textContent = snippets[snippetKind]($("model").value, readForm());
}

async function copySnippet(kind) {
  snippetKind = kind;
  updateSnippet();
  const text = $("code-sample").textContent;
  try {
    await navigator.clipboard.writeText(text);
    setProgressText(`Copied the ${kind === "curl" ? "curl command" : "Python script"} (the key is read from KILN_API_KEY).`);
  } catch {
    setProgressText("Copying was refused by the browser; select the sample below and copy it.");
  }
}

// ---------------------------------------------------------------- start

function wire() {
  $("api-key").value = savedKey();
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
    showAlert("");
    setProgressText(key ? "Key saved in this browser." : "Key removed.");
    loadGallery(true);
  });
  $("forget-key").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORAGE);
    $("api-key").value = "";
    setProgressText("Key removed from this browser.");
    loadGallery(true);
  });
  $("model").addEventListener("change", () => selectModel($("model").value));
  $("model-form").addEventListener("submit", submit);
  $("model-form").addEventListener("input", updateSnippet);
  $("model-form").addEventListener("change", updateSnippet);
  $("cancel").addEventListener("click", cancel);
  $("copy-curl").addEventListener("click", () => copySnippet("curl"));
  $("copy-python").addEventListener("click", () => copySnippet("python"));
  $("gallery-more").addEventListener("click", () => loadGallery(false));
}

wire();
await loadModels();
await loadGallery(true);

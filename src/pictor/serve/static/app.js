// pictor's web page: plain DOM, no build step. Text from the server is only ever set as textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "pictor-api-key";
const PAGE_SIZE = 24;

let galleryOffset = 0;
let currentJob = null;
let viewed = null; // {meta} of the image open in the viewer
let fillModel = false; // the served model is FLUX.1 Fill: it only repaints masked pictures
let controlKind = null; // "canny" or "depth": the served model is FLUX.1 Canny / Depth and needs a control picture
let reduxModel = false; // the server has FLUX.1 Redux loaded: a Redux picture may prompt, variations use it
let ipAdapterModel = false; // the server has XLabs' FLUX.1 IP-Adapter loaded: an IP-Adapter picture may prompt
let controlnetCards = []; // the server's FLUX.1 ControlNets (GET /v1/models), in the order requests give their pictures
let galleryShown = false; // the history has been listed once
let upscalerCard = null; // the server's upscale model (GET /v1/models: upscaler), or null: history images get an Upscale button

// -- API calls with the key ------------------------------------------------------------------------

function askForKey() {
  return new Promise((resolve) => {
    const dialog = $("key-dialog");
    const form = $("key-form");
    const done = (event) => {
      event.preventDefault();
      const key = $("api-key").value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY_STORAGE, key);
      form.removeEventListener("submit", done);
      dialog.close();
      resolve();
    };
    form.addEventListener("submit", done);
    dialog.showModal();
    $("api-key").focus();
  });
}

async function api(path, options = {}) {
  for (let attempt = 0; attempt < 3; attempt++) {
    const headers = { ...(options.headers || {}) };
    const key = sessionStorage.getItem(KEY_STORAGE);
    if (key) headers.Authorization = `Bearer ${key}`;
    const response = await fetch(path, { ...options, headers });
    if (response.status !== 401) return response;
    sessionStorage.removeItem(KEY_STORAGE);
    await askForKey();
  }
  throw new Error("the API key was refused");
}

// The message of a failed answer: the server's own words where it gave them.
function errorMessage(response, body) {
  return (body.error && body.error.message) || `${response.status} ${response.statusText}`;
}

async function apiJSON(path, options = {}) {
  const response = await api(path, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(errorMessage(response, body));
  return body;
}

// -- the form ---------------------------------------------------------------------------------------

function requestFromForm() {
  const body = { prompt: $("prompt").value };
  const number = (id, parse) => {
    const text = $(id).value.trim();
    return text === "" ? undefined : parse(text);
  };
  const width = number("width", Number);
  const height = number("height", Number);
  if (width !== undefined && height !== undefined) body.size = `${width}x${height}`;
  const values = {
    negative_prompt: $("negative_prompt").value || undefined,
    prompt_weights: $("prompt_weights").checked || undefined,  // unchecked: not sent (the server's false)
    prompt_editing: $("prompt_editing").checked || undefined,  // likewise
    composable: $("composable").checked || undefined,  // likewise
    steps: number("steps", Number),
    guidance: number("guidance", Number),
    sampler: $("sampler").value || undefined,
    schedule: $("schedule").value || undefined,  // "model default": not sent (the model's own)
    seed: number("seed", Number),
    // variation seeds: sent as typed, a variation seed without a strength too (the server's 400 says what is
    // missing); seed resize from as WxH text, which the server checks (an edit refuses it)
    variation_strength: number("variation_seed_strength", Number),
    variation_seed: number("variation_seed", Number),
    seed_resize_from: $("seed_resize_from").value.trim() || undefined,
    n: number("n", Number),
    cache_threshold: number("cache_threshold", Number),
    // sent as typed, an overlap without a tile too: the server's 400 then says what is missing
    denoise_tile: number("denoise_tile", Number),
    denoise_tile_overlap: number("denoise_tile_overlap", Number),
  };
  const hiresScale = number("hires_scale", Number);
  if (hiresScale !== undefined) {  // the strength and steps belong to the hires fix: sent only with it
    values.hires_scale = hiresScale;
    values.hires_strength = number("hires_strength", Number);
    values.hires_steps = number("hires_steps", Number);
    values.hires_upscaler = $("hires_upscaler").value || undefined;  // empty: Lanczos, the server's default
  }
  values.guidance_method = guidanceMethodFromForm(number);
  const loras = lorasFromForm();
  if (loras.length) values.loras = loras;
  for (const [name, value] of Object.entries(values)) if (value !== undefined) body[name] = value;
  return body;
}

// -- the guidance method (pictor.guidance_methods): the select, rescale, the interval, and the chosen
// method's own parameters, the others hidden. Sent as the guidance_method object with the fields typed (an
// edit's form takes its JSON text); plain CFG with nothing typed is not sent (the server's own).

const GUIDANCE_FIELDS = {  // input id -> the object's field, and the method it belongs to (none: any)
  guidance_rescale: ["rescale"],
  guidance_start: ["start"],
  guidance_stop: ["stop"],
  apg_eta: ["eta", "apg"],
  apg_norm_threshold: ["norm_threshold", "apg"],
  apg_momentum: ["momentum", "apg"],
  zero_init_steps: ["zero_init_steps", "cfg-zero-star"],
};

function guidanceMethodFromForm(number) {
  const method = $("guidance_method").value || "cfg";
  const chosen = { method };
  for (const [id, [field, owner]] of Object.entries(GUIDANCE_FIELDS)) {
    if (owner && owner !== method) continue;  // another method's: hidden, not sent
    const value = number(id, Number);
    if (value !== undefined) chosen[field] = value;
  }
  return method === "cfg" && Object.keys(chosen).length === 1 ? undefined : chosen;
}

function showGuidanceMethod() {
  const method = $("guidance_method").value || "cfg";
  for (const element of document.querySelectorAll("[data-guidance-method]")) {
    element.hidden = element.dataset.guidanceMethod !== method;
  }
}

// -- regional attention's Regional-Prompting-FLUX options (the server's regional_steps and the like): four
// numbers under Regions, each sent as typed (the server checks them and names a bad one) and only with
// Regional attention checked and regions, as the server takes them; empty: the default.

const REGIONAL_OPTIONS = [
  "regional_steps",
  "regional_double_interval",
  "regional_single_interval",
  "regional_base_ratio",
];

function regionalOptionsFromForm() {
  const chosen = {};
  for (const name of REGIONAL_OPTIONS) {
    const text = $(name).value.trim();
    if (text !== "") chosen[name] = Number(text);
  }
  return chosen;
}

// A record's (or a settings body's) options into the form; the section opens when it names any.
function fillRegionalOptions(record) {
  let named = false;
  for (const name of REGIONAL_OPTIONS) {
    const value = record.regional_attention ? record[name] : undefined;
    $(name).value = value ?? "";
    named ||= value !== undefined && value !== null;
  }
  if (named) $("regional-options").open = true;
}

// A record's (or a settings body's) guidance_method into the form: the method and each parameter it names.
function fillGuidanceMethod(kept) {
  const method = (kept && kept.method) || "cfg";
  $("guidance_method").value = method;
  for (const [id, [field]] of Object.entries(GUIDANCE_FIELDS)) $(id).value = kept?.[field] ?? "";
  showGuidanceMethod();
  if (kept) $("guidance-settings").open = true;  // (closed, it keeps the settings short)
}

// -- LoRAs: one scale field per LoRA the server offers (GET /v1/loras); empty is off ----------------

function loraInputs() {
  return [...document.querySelectorAll("#lora-list input")];
}

function lorasFromForm() {
  return loraInputs()
    .filter((input) => input.value.trim() !== "")
    .map((input) => ({ name: input.dataset.name, scale: Number(input.value) }));
}

async function loadLoras(listing) {
  listing = listing || (await apiJSON("/v1/loras"));
  const scales = new Map(loraInputs().map((input) => [input.dataset.name, input.value]));  // kept by name
  const rows = listing.data.flatMap((lora, i) => {
    const label = document.createElement("label");
    label.htmlFor = `lora-${i}`;
    label.textContent = `LoRA ${lora.name}`;
    const input = document.createElement("input");
    Object.assign(input, { id: `lora-${i}`, type: "number", step: "any", min: "-10", max: "10" });
    Object.assign(input, { placeholder: "off", inputMode: "decimal" });
    input.dataset.name = lora.name;
    input.value = scales.get(lora.name) ?? "";
    return [label, input];
  });
  $("lora-list").replaceChildren(...rows);
  $("lora-settings").hidden = !listing.refreshable;  // a server with a LoRA folder, even an empty one
}

// A PNG's metadata (its pictor record, or A1111's parameters text) into the form: POST /v1/images/settings
// gives a generation body, which the form takes as it takes a record; what it leaves is shown below.
async function settingsFromImage(file) {
  const form = new FormData();
  form.append("image", file);
  const answer = await apiJSON("/v1/images/settings", { method: "POST", body: form });
  const s = answer.settings;
  const [width, height] = s.size ? s.size.split("x").map(Number) : [undefined, undefined];
  const hires = s.hires_scale === undefined ? undefined
    : { scale: s.hires_scale, strength: s.hires_strength, steps: s.hires_steps, upscaler: s.hires_upscaler };
  fillForm({ ...s, width, height, hires });
  const notices = $("settings-notices");
  notices.textContent = answer.notices.join(" ");
  notices.hidden = answer.notices.length === 0;
  setError("");
}

function fillForm(record) {
  $("prompt").value = record.prompt || "";
  fillBoxes("layout", record.layout);
  fillBoxes("regions", record.regions);  // normalised in a record: each with its strength
  $("negative_prompt").value = record.negative_prompt || "";
  $("prompt_weights").checked = Boolean(record.prompt_weights || record.prompt_editing); // editing reads weights too
  $("prompt_editing").checked = Boolean(record.prompt_editing);
  $("composable").checked = Boolean(record.composable);  // a record says it only when on
  $("regional_attention").checked = Boolean(record.regional_attention);  // likewise, and only with regions
  fillRegionalOptions(record);  // its options, recorded only when not their defaults
  $("width").value = record.width ?? "";
  $("height").value = record.height ?? "";
  $("steps").value = record.steps ?? "";
  $("guidance").value = record.guidance ?? "";
  $("sampler").value = record.sampler || "";
  $("schedule").value = record.schedule || "";  // a record names the one that ran, the model's own too
  fillGuidanceMethod(record.guidance_method);  // a record says it only when not plain CFG
  $("seed").value = record.seed ?? "";
  // A record's variation seed is its own image's (its run's first + its index), which n = 1 draws again.
  $("variation_seed_strength").value = record.variation_strength || "";
  $("variation_seed").value = record.variation_strength ? (record.variation_seed ?? "") : "";
  const resize = record.seed_resize_from;  // a record's [w, h], or a settings body's "WxH"
  $("seed_resize_from").value = Array.isArray(resize) ? resize.join("x") : (resize || "");
  $("n").value = 1;
  $("cache_threshold").value = record.cache_threshold ?? "";
  $("denoise_tile").value = record.denoise_tile ?? "";
  $("denoise_tile_overlap").value = record.denoise_tile_overlap ?? "";
  $("settings").open = true;
  const hires = record.hires || {};
  $("hires_scale").value = hires.scale ?? "";
  $("hires_strength").value = hires.strength ?? "";
  $("hires_steps").value = hires.steps ?? "";
  // An upscale model the server does not have (or Lanczos) leaves the choice at Lanczos.
  const upscalerOption = [...$("hires_upscaler").options].some((o) => o.value && o.value === hires.upscaler);
  $("hires_upscaler").value = upscalerOption ? hires.upscaler : "";
  if (record.hires) $("hires-settings").open = true;
  const scales = new Map((record.loras || []).map((entry) => [entry.name, entry.scale]));
  for (const input of loraInputs()) input.value = scales.get(input.dataset.name) ?? "";
  if (scales.size) $("lora-settings").open = true;
  // The control picture itself is not kept (only its hash): the one chosen stays; its thresholds come back.
  const canny = record.control_canny || null;
  $("control-canny").checked = Boolean(canny);
  $("canny-low").value = canny ? canny[0] : "";
  $("canny-high").value = canny ? canny[1] : "";
  // Likewise the Redux picture (only its hash is kept): its strength comes back.
  $("redux-strength").value = record.redux ? record.redux.strength : "";
  if (record.redux_image && reduxModel) $("redux-settings").open = true;
  // And the IP-Adapter picture (only its hash is kept): its scale comes back.
  $("ip-adapter-scale").value = record.ip_adapter ? record.ip_adapter.scale : "";
  if (record.ip_adapter_image && ipAdapterModel) $("ip-adapter-settings").open = true;
  // And the ControlNet pictures (only their hashes are kept): their scales, modes and window come back.
  for (const [i, entry] of (record.controlnets || []).entries()) {
    if (!$(`controlnet-scale-${i}`)) break;  // a record of another server's ControlNets
    $(`controlnet-scale-${i}`).value = entry.scale ?? "";
    if ($(`controlnet-mode-${i}`)) $(`controlnet-mode-${i}`).value = entry.mode_name ?? "";
  }
  $("controlnet-start").value = record.controlnet_start ?? "";
  $("controlnet-end").value = record.controlnet_end ?? "";
  if (record.controlnets && controlnetCards.length) $("controlnet-settings").open = true;
}

// Reuse settings, beside fillForm: an edit's own settings (the source and mask themselves are not kept, only
// their hashes; "Settings from an image" leaves the edit section as it is): its strength, the upscaling
// (source_upscale), inpainting only the masked area, and outpainting and the mask's feather. A masked area's
// record keeps the size it was drawn at as its width and height, which Inpaint size takes back as WxH, so the
// area is drawn at that size again even where it was the model's default. A record without them (a
// generation's) clears them.
function fillEditSettings(record) {
  $("strength").value = record.source_image ? (record.strength ?? "") : "";
  const upscale = record.source_upscale || {};
  $("edit-upscale").value = upscale.scale ?? "";
  // An upscale model the server does not have (or Lanczos) leaves the choice at Lanczos, as the hires fix's.
  const upscalerOption = [...$("edit-upscaler").options].some((o) => o.value && o.value === upscale.upscaler);
  $("edit-upscaler").value = upscalerOption ? upscale.upscaler : "";
  const masked = record.inpaint_area === "masked";
  $("inpaint-area").value = masked ? "masked" : "";
  $("mask-padding").value = masked ? (record.mask_padding ?? "") : "";
  $("inpaint-size").value = masked && record.width && record.height ? `${record.width}x${record.height}` : "";
  // An outpainting's expand as L,T,R,B, and its fill when not the default edge. A record says its feather
  // whenever the pipeline had a mask, an outpainting's own added area included; only an edit sent with a
  // mask (its hash is in the record) takes it back: sent without one, the server refuses a feather.
  $("edit-expand").value = Array.isArray(record.expand) ? record.expand.join(",") : "";
  $("edit-fill").value = record.expand && record.fill === "noise" ? "noise" : "";
  $("edit-feather").value = record.mask ? (record.feather ?? "") : "";
  if (record.source_image) $("edit-settings").open = true;
}

function setStatus(text) {
  $("status").textContent = text;
}

function setError(text) {
  $("error").textContent = text || "";
}

// A job's warnings (e.g. the end of a prompt longer than the model reads): one list item each, as text.
function showWarnings(list, warnings) {
  list.replaceChildren(
    ...(warnings || []).map((text) => {
      const item = document.createElement("li");
      item.textContent = text;
      return item;
    }),
  );
  list.hidden = list.children.length === 0;
}

function setBusy(busy) {
  $("generate-button").disabled = busy;
  $("cancel-button").hidden = !busy;
  $("progress").hidden = !busy;
  if (busy) $("progress").value = 0;
  if (!busy) hidePreview();
}

// -- live previews ---------------------------------------------------------------------------------

// A "preview" event carries the running job's newest preview as a data URL (no second request, which
// could race the job's end).
function showPreview(data) {
  $("live-preview").src = data.image;
  $("live-preview").dataset.step = String(data.step);
  $("live-preview").hidden = false;
}

function hidePreview() {
  $("live-preview").hidden = true;
  $("live-preview").removeAttribute("src");
  delete $("live-preview").dataset.step;
}

// An edit or a variation is the same request as multipart form data: the picture it starts from, the
// reference and context pictures when chosen, the fields as text (a layout, regions and LoRAs as their JSON
// text), and the strength of its own section.
function multipartFromForm(image, strengthInput, body) {
  const form = new FormData();
  form.append("image", image);
  if ($("reference-image").files.length) form.append("reference_image", $("reference-image").files[0]);
  const context = contextFile();
  if (context) form.append("context_image", context);
  const strength = strengthInput.disabled ? "" : strengthInput.value.trim();
  if (strength !== "") form.append("strength", strength);
  for (const [name, value] of Object.entries(body)) {
    form.append(name, typeof value === "object" ? JSON.stringify(value) : String(value));
  }
  return form;
}

// For POST /v1/jobs/edits. The edit keeps the source's size, so width and height are not sent. A control
// picture (FLUX.1 Canny / Depth) goes as a file, its Canny thresholds as "true" or "LOW,HIGH"; the ControlNets'
// pictures (`nets`, see controlnetChoices) as the controlnet_image field repeated, their lists as JSON text.
// The variation seed and strength go as for a generation; Seed resize from goes too, so the server's 400 names
// it (an edit's composition is its picture's) rather than the page dropping it unseen.
function editFromForm({ size, ...body }, nets) {
  const form = multipartFromForm($("edit-image").files[0], $("strength"), body);
  if (nets) {
    for (const file of nets.files) form.append("controlnet_image", file);
    for (const [name, value] of Object.entries(controlnetFields(nets))) {
      form.append(name, typeof value === "object" ? JSON.stringify(value) : String(value));
    }
  }
  if ($("edit-mask").files.length) form.append("mask", $("edit-mask").files[0]);
  // An upscaling edit, and inpainting only the masked area: sent when set, so the server's 400 names a
  // setting that does not go with the rest (a masked area without a mask, say).
  const upscale = $("edit-upscale").value.trim();
  if (upscale !== "") {
    form.append("upscale", upscale);
    if ($("edit-upscaler").value) form.append("upscaler", $("edit-upscaler").value);
  }
  if ($("inpaint-area").value) form.append("inpaint_area", $("inpaint-area").value);
  const padding = $("mask-padding").value.trim();
  if (padding !== "") form.append("mask_padding", padding);
  const inpaintSize = $("inpaint-size").value.trim();  // WxH as typed: the server checks its form and size
  if (inpaintSize !== "") form.append("inpaint_size", inpaintSize);
  // Outpainting and the mask's feather, likewise sent when set: L,T,R,B as typed (the server says what is
  // wrong with it), and a fill or feather without an expand or a mask is refused there by name, not dropped.
  const expand = $("edit-expand").value.trim();
  if (expand !== "") form.append("expand", expand);
  if ($("edit-fill").value) form.append("fill", $("edit-fill").value);
  const feather = $("edit-feather").value.trim();
  if (feather !== "") form.append("feather", feather);
  const control = controlFile();
  if (control) {
    form.append("control_image", control);
    const canny = cannySetting();
    if (canny !== undefined) form.append("control_canny", canny === true ? "true" : canny.join(","));
  }
  const redux = reduxFile();
  if (redux) {  // FLUX.1 Redux's picture as a file, its strength as a field
    form.append("redux_image", redux);
    if (reduxStrength() !== undefined) form.append("redux_strength", reduxStrength());
  }
  const ipAdapter = ipAdapterFile();
  if (ipAdapter) {  // the IP-Adapter's picture as a file, its scale as a field
    form.append("ip_adapter_image", ipAdapter);
    if (ipAdapterScale() !== undefined) form.append("ip_adapter_scale", ipAdapterScale());
  }
  return form;
}

// For POST /v1/jobs/variations. Width and Height go as the size the picture is resized to first. What a
// variation does not take (a layout, regions, the hires fix, a reference picture) goes too, so that the
// server's 400 names it on the page, rather than the page dropping a choice unseen.
// With FLUX.1 Redux the picture is the variation's Redux picture: its strength goes instead of img2img's
// (whose input is disabled then). The guidance method goes as its JSON text, as an edit's.
function variationFromForm(body) {
  const form = multipartFromForm($("variation-image").files[0], $("variation-strength"), body);
  if (reduxModel && reduxStrength() !== undefined) form.append("redux_strength", reduxStrength());
  return form;
}

// -- box editors: Layout (a phrase per box, for a layout adapter) and Regions (a prompt and a strength per
// box, regional prompts with any model). One list item per box, its text over its four edges, and a preview
// of where the boxes go; both are built, read and checked by the same functions, told apart by BOX_EDITORS.

const EDGES = ["left", "top", "right", "bottom"];
// Per editor: the ids of its list, preview and section; `noun`, how the page names one box ("Box 2",
// "Region 2"); `text`, the API's key of a box's text; `strength`, the most a box's strength may be (regions
// only: pictor.regional_prompts.MAX_STRENGTH); `max`, how many boxes the API takes (regions: MAX_REGIONS).
const BOX_EDITORS = {
  layout: { list: "layout-boxes", preview: "layout-preview", section: "layout-settings", noun: "Box", text: "phrase" },
  regions: {
    list: "region-boxes",
    preview: "region-preview",
    section: "regions-settings",
    noun: "Region",
    text: "prompt",
    strength: 10,
    max: 8,
  },
};

// A labelled input of a box row: the label's visible word, and the input's class (nameBoxes names it).
function boxField(word, className, attrs, value) {
  const label = document.createElement("label");
  label.textContent = word;
  const input = document.createElement("input");
  Object.assign(input, attrs);
  input.className = className;
  input.value = value;
  label.append(input);
  return label;
}

function addBox(editor, box = [0.1, 0.1, 0.5, 0.5], text = "", strength = undefined) {
  const kind = BOX_EDITORS[editor];
  const item = document.createElement("li");
  const row = document.createElement("div");
  row.className = kind.strength ? "layout-box with-strength" : "layout-box";
  const word = kind.text[0].toUpperCase() + kind.text.slice(1);
  const textLabel = boxField(word, "box-text", { type: "text", placeholder: "a red circle" }, text);
  textLabel.className = "phrase";
  row.append(textLabel);
  EDGES.forEach((edge, i) => {
    // No min/max and step "any": boxes from the API or CLI may hold any fraction, and the page's own check
    // (boxesFromForm) names the box that is wrong, where the browser's bubble would not.
    const attrs = { type: "number", step: "any", inputMode: "decimal" };
    row.append(boxField(edge[0].toUpperCase() + edge.slice(1), `box-${edge}`, attrs, String(box[i])));
  });
  if (kind.strength) {  // empty: the server's default (1, the region and the whole prompt weigh alike)
    const attrs = { type: "number", step: "any", inputMode: "decimal", placeholder: "1" };
    row.append(boxField("Strength", "box-strength", attrs, strength === undefined ? "" : String(strength)));
  }
  const remove = document.createElement("button");
  remove.type = "button";
  remove.className = "box-remove";
  remove.textContent = "Remove";
  remove.addEventListener("click", () => {
    item.remove();
    nameBoxes(editor);
    drawBoxes(editor);
  });
  row.append(remove);
  row.addEventListener("input", () => drawBoxes(editor));
  item.append(row);
  $(kind.list).append(item);
  nameBoxes(editor);
  drawBoxes(editor);
}

// The editor's boxes from a record or settings body (a layout's or regions' list; none clears them).
function fillBoxes(editor, items) {
  const kind = BOX_EDITORS[editor];
  $(kind.list).replaceChildren();
  for (const item of items || []) addBox(editor, item.box, item[kind.text], item.strength);
  drawBoxes(editor);
  if (items && items.length) $(kind.section).open = true;
}

// Each box's inputs are named by its number ("Box 2 left", "Region 1 strength"), so screen readers and tests
// can tell them apart.
function nameBoxes(editor) {
  const kind = BOX_EDITORS[editor];
  [...$(kind.list).children].forEach((item, i) => {
    const name = `${kind.noun} ${i + 1}`;
    item.querySelector(".box-text").setAttribute("aria-label", `${name} ${kind.text}`);
    for (const edge of EDGES) item.querySelector(`.box-${edge}`).setAttribute("aria-label", `${name} ${edge}`);
    const strength = item.querySelector(".box-strength");
    if (strength) strength.setAttribute("aria-label", `${name} strength`);
    item.querySelector(".box-remove").setAttribute("aria-label", `Remove ${name.toLowerCase()}`);
  });
}

// The boxes as the API takes them ([{box: [x0, y0, x1, y1], phrase}] for a layout, [{box, prompt,
// strength}] for regions, an empty strength left out), as {items}, or {error} naming the box that is wrong.
function boxesFromForm(editor) {
  const kind = BOX_EDITORS[editor];
  const rows = [...$(kind.list).children];
  if (kind.max && rows.length > kind.max) {
    return { error: `At most ${kind.max} ${editor}: each is one more pass of the model at every step. Remove ${rows.length - kind.max}.` };
  }
  const items = [];
  for (const [i, item] of rows.entries()) {
    const name = `${kind.noun} ${i + 1}`;
    const text = item.querySelector(".box-text").value.trim();
    const box = EDGES.map((edge) => Number(item.querySelector(`.box-${edge}`).value.trim() || NaN));
    if (!text) return { error: `${name}: write what to draw in it.` };
    const [x0, y0, x1, y1] = box;
    if (!box.every(Number.isFinite) || !(0 <= x0 && x0 < x1 && x1 <= 1 && 0 <= y0 && y0 < y1 && y1 <= 1)) {
      return { error: `${name}: left must be less than right and top less than bottom, all from 0 to 1.` };
    }
    const entry = { box, [kind.text]: text };
    const strength = item.querySelector(".box-strength");
    if (strength && strength.value.trim() !== "") {
      const value = Number(strength.value.trim());
      if (!(Number.isFinite(value) && value > 0 && value <= kind.strength)) {
        return { error: `${name}: the strength must be above 0 and at most ${kind.strength} (empty: 1, the region's prompt and the whole prompt weigh alike).` };
      }
      entry.strength = value;
    }
    items.push(entry);
  }
  return { items: items.length ? items : undefined };
}

function drawBoxes(editor) {
  const kind = BOX_EDITORS[editor];
  const svg = $(kind.preview);
  const ns = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  for (const item of $(kind.list).children) {
    const [x0, y0, x1, y1] = EDGES.map((edge) => Number(item.querySelector(`.box-${edge}`).value));
    if (![x0, y0, x1, y1].every(Number.isFinite) || x1 <= x0 || y1 <= y0) continue;
    const rect = document.createElementNS(ns, "rect");
    const attrs = { x: x0 * 100, y: y0 * 100, width: (x1 - x0) * 100, height: (y1 - y0) * 100 };
    for (const [name, value] of Object.entries(attrs)) rect.setAttribute(name, String(value));
    const text = document.createElementNS(ns, "text");
    text.setAttribute("x", String(x0 * 100 + 1.5));
    text.setAttribute("y", String(y0 * 100 + 7));
    text.textContent = item.querySelector(".box-text").value;
    svg.append(rect, text);
  }
}

// A reference picture travels in the JSON request as a data: URL (base64), which the server decodes.
function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`could not read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

async function withReference(body, nets) {
  if (nets) {  // the ControlNets' pictures the same way, in their order, with their settings
    body.controlnet_images = await Promise.all(nets.files.map(readAsDataURL));
    Object.assign(body, controlnetFields(nets));
  }
  const files = $("reference-image").files;
  if (files.length) body.reference_image = await readAsDataURL(files[0]);
  const context = contextFile();
  if (context) body.context_image = await readAsDataURL(context);  // FLUX.1 Kontext's, the same way
  const control = controlFile();
  if (control) {  // FLUX.1 Canny / Depth's, the same way, with the Canny thresholds when edges are drawn
    body.control_image = await readAsDataURL(control);
    const canny = cannySetting();
    if (canny !== undefined) body.control_canny = canny;
  }
  const redux = reduxFile();
  if (redux) {  // FLUX.1 Redux's, the same way, with its strength
    body.redux_image = await readAsDataURL(redux);
    if (reduxStrength() !== undefined) body.redux_strength = Number(reduxStrength());
  }
  const ipAdapter = ipAdapterFile();
  if (ipAdapter) {  // the IP-Adapter's, the same way, with its scale
    body.ip_adapter_image = await readAsDataURL(ipAdapter);
    if (ipAdapterScale() !== undefined) body.ip_adapter_scale = Number(ipAdapterScale());
  }
  return body;
}

// -- FLUX.1 ControlNets: a picture and a scale per ControlNet the server loaded, a mode for a Union one ------

function controlnetLabel(id, text, title) {
  const label = document.createElement("label");
  label.htmlFor = id;
  label.textContent = text;
  label.title = title;
  return label;
}

// One row each (picture, mode, scale), built anew only when the server's ControlNets change, so pictures
// chosen while the model loads stay.
function showControlNets(cards) {
  const changed = JSON.stringify(cards) !== JSON.stringify(controlnetCards);
  controlnetCards = cards;
  $("controlnet-settings").hidden = cards.length === 0;
  for (const id of ["controlnet-start", "controlnet-end"]) $(id).disabled = cards.length === 0;
  if (!changed) return;
  if (cards.length) $("controlnet-settings").open = true;  // every image needs their pictures
  $("controlnet-summary").textContent =
    cards.length ? `ControlNet pictures (${cards.map((c) => c.name).join(", ")})` : "ControlNet pictures";
  const rows = cards.flatMap((card, i) => {
    const what = `${card.name} (${card.kind})`;
    const picture = document.createElement("input");
    Object.assign(picture, { id: `controlnet-image-${i}`, type: "file", title: what });
    picture.accept = "image/png,image/jpeg,image/webp";
    const items = [controlnetLabel(picture.id, `ControlNet ${i + 1} picture`, what), picture];
    if (card.modes) {  // a Union ControlNet: what its picture is
      const select = document.createElement("select");
      select.id = `controlnet-mode-${i}`;
      select.append(new Option("choose a mode", ""), ...card.modes.map((mode) => new Option(mode, mode)));
      items.push(controlnetLabel(select.id, `ControlNet ${i + 1} mode`, what), select);
    }
    const scale = document.createElement("input");
    Object.assign(scale, { id: `controlnet-scale-${i}`, type: "number", min: "0", max: "10", step: "any" });
    Object.assign(scale, { placeholder: "1", inputMode: "decimal" });
    items.push(controlnetLabel(scale.id, `ControlNet ${i + 1} scale`, what), scale);
    return items;
  });
  $("controlnet-list").replaceChildren(...rows);
}

// The ControlNets' pictures and settings as chosen ({files, scales, modes, start, end}), or {error} saying
// what is missing: every image needs a picture per ControlNet, and a Union ControlNet its mode.
function controlnetChoices() {
  const files = [];
  const scales = [];
  const modes = [];
  for (const [i, card] of controlnetCards.entries()) {
    const input = $(`controlnet-image-${i}`);
    if (!input.files.length) {
      return { error: `This server has FLUX.1 ControlNets: every image follows one picture each. Choose ControlNet ${i + 1}'s picture (${card.name}) under ControlNet pictures.` };
    }
    files.push(input.files[0]);
    const mode = card.modes ? $(`controlnet-mode-${i}`).value : "";
    if (card.modes && !mode) {
      return { error: `ControlNet ${i + 1} (${card.name}) is a Union ControlNet: choose what its picture is under ControlNet ${i + 1} mode.` };
    }
    modes.push(mode || null);
    scales.push($(`controlnet-scale-${i}`).value.trim());
  }
  const number = (id) => ($(id).value.trim() === "" ? undefined : Number($(id).value));
  return {
    files,
    // An empty scale is 1, the server's default; none given: none sent.
    scales: scales.some((s) => s !== "") ? scales.map((s) => (s === "" ? 1 : Number(s))) : undefined,
    modes: modes.some((m) => m !== null) ? modes : undefined,  // null for a ControlNet without modes
    start: number("controlnet-start"),
    end: number("controlnet-end"),
  };
}

// The request fields of the ControlNets' settings (not their pictures), those given only.
function controlnetFields(nets) {
  const fields = {
    controlnet_scales: nets.scales,
    controlnet_modes: nets.modes,
    controlnet_start: nets.start,
    controlnet_end: nets.end,
  };
  return Object.fromEntries(Object.entries(fields).filter(([, value]) => value !== undefined));
}

// The chosen Redux picture, or null: sent only while the server has FLUX.1 Redux loaded.
function reduxFile() {
  const input = $("redux-image");
  return !input.disabled && input.files.length ? input.files[0] : null;
}

// The Redux strength as typed, or undefined when empty (the server's 1 applies).
function reduxStrength() {
  const text = $("redux-strength").value.trim();
  return $("redux-strength").disabled || text === "" ? undefined : text;
}

// The chosen IP-Adapter picture, or null: sent only while the server has the IP-Adapter loaded.
function ipAdapterFile() {
  const input = $("ip-adapter-image");
  return !input.disabled && input.files.length ? input.files[0] : null;
}

// The IP-Adapter scale as typed, or undefined when empty (the server's 1 applies).
function ipAdapterScale() {
  const text = $("ip-adapter-scale").value.trim();
  return $("ip-adapter-scale").disabled || text === "" ? undefined : text;
}

// The chosen control picture, or null: like the context picture, sent only while the model takes one.
function controlFile() {
  const input = $("control-image");
  return !input.disabled && input.files.length ? input.files[0] : null;
}

// "Draw Canny edges" (a Canny model only): true for the default thresholds, [low, high] when either is
// given (the other's default filling in), undefined when off.
function cannySetting() {
  if (controlKind !== "canny" || !$("control-canny").checked) return undefined;
  const low = $("canny-low").value.trim();
  const high = $("canny-high").value.trim();
  if (low === "" && high === "") return true;
  return [Number(low === "" ? $("canny-low").placeholder : low), Number(high === "" ? $("canny-high").placeholder : high)];
}

const CONTROL_WORDS = {
  canny: ["FLUX.1 Canny", "an edge map, or a photo with Draw Canny edges"],
  depth: ["FLUX.1 Depth", "a depth map (near = bright)"],
};

// The chosen context picture, or null. The input is disabled while the model is not a Kontext one, so a
// file picked before is not sent to a model that would refuse it.
function contextFile() {
  const input = $("context-image");
  return !input.disabled && input.files.length ? input.files[0] : null;
}

// What the form's button does: with a picture under Edit an image or Variations (one at a time, see
// choosePicture) it edits or varies that picture instead of generating.
function formMode() {
  if ($("variation-image").files.length) return "variation";
  return $("edit-image").files.length ? "edit" : "generate";
}

const BUTTON_TEXT = { generate: "Generate", edit: "Edit image", variation: "Make variations" };

function showMode() {
  $("generate-button").textContent = BUTTON_TEXT[formMode()];
}

// An edit and a variation each start from a picture of their own: choosing one clears the other's, so the
// button never sends a picture the user forgot was there. (A cancelled file dialog chooses nothing.)
function choosePicture(kind) {
  const [input, others] =
    kind === "edit" ? ["edit-image", ["variation-image"]] : ["variation-image", ["edit-image", "edit-mask"]];
  if ($(input).files.length) for (const id of others) $(id).value = "";
  showMode();
}

// `body` is a generation's JSON for POST /v1/jobs, or an edit's or a variation's form data for `path`.
async function submit(body, path = "/v1/jobs") {
  setError("");
  showWarnings($("warnings"), []);
  setBusy(true);
  setStatus("Queued…");
  try {
    const options =
      body instanceof FormData
        ? { method: "POST", body }
        : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
    const job = await apiJSON(path, options);
    currentJob = job.id;
    const final = await follow(job.id);
    showWarnings($("warnings"), final.warnings);
    if (final.status === "succeeded") {
      setStatus(`Done: ${final.results.length} image${final.results.length === 1 ? "" : "s"}.`);
    } else if (final.status === "cancelled") {
      setStatus("Cancelled.");
    } else {
      setStatus("");
      setError(final.error ? final.error.message : `job ${final.status}`);
    }
    await loadGallery(true);
  } catch (err) {
    setStatus("");
    setError(err.message);
  } finally {
    currentJob = null;
    setBusy(false);
  }
}

// Server-sent events over fetch (EventSource cannot send the Authorization header).
async function follow(jobId) {
  const response = await api(`/v1/jobs/${jobId}/events`);
  if (!response.ok) throw new Error(`events: ${response.status}`);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let last = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = parseEvent(block);
      if (!event) continue;
      if (event.name === "progress") {
        $("progress").value = event.data.fraction;
        setStatus(`Step ${event.data.step} of ${event.data.total}`);
      } else if (event.name === "preview") {
        showPreview(event.data);
      } else if (event.name === "status") {
        last = event.data;
        if (last.status === "queued") setStatus(`Queued (position ${(last.queue_position ?? 0) + 1})`);
        if (last.status === "running") setStatus("Running…");
      } else if (event.name === "done") {
        return event.data;
      } else if (event.name === "draining") {
        throw new Error("The server is restarting; the job stays queued and will run after it.");
      }
    }
  }
  if (last) return apiJSON(`/v1/jobs/${jobId}`);
  throw new Error("the event stream ended early");
}

function parseEvent(block) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue;
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trim());
  }
  if (!data.length) return null;
  return { name, data: JSON.parse(data.join("\n")) };
}

// -- the gallery ---------------------------------------------------------------------------------

async function loadGallery(reset) {
  if (reset) {
    galleryOffset = 0;
    $("gallery").replaceChildren();
  }
  const q = encodeURIComponent($("search").value.trim());
  const list = await apiJSON(`/v1/jobs?limit=${PAGE_SIZE}&offset=${galleryOffset}&q=${q}`);
  galleryOffset += list.data.length;
  for (const job of list.data) {
    for (const result of job.results) $("gallery").append(galleryItem(job, result));
    if (!job.results.length && job.status !== "succeeded") $("gallery").append(statusItem(job));
  }
  $("more-button").hidden = !list.has_more;
  $("gallery-empty").hidden = $("gallery").children.length > 0;
  galleryShown = true;
}

const FINISHED = new Set(["succeeded", "failed", "cancelled"]); // the statuses a history entry may be deleted in

function galleryItem(job, result) {
  const item = document.createElement("li");
  item.dataset.job = job.id;
  const button = document.createElement("button");
  button.type = "button";
  button.className = "thumb";
  button.title = entryText(job);
  const img = document.createElement("img");
  img.src = result.url;
  img.alt = `${entryText(job)} (seed ${result.seed})`;
  img.loading = "lazy";
  img.width = job.request.width || 64;
  img.height = job.request.height || 64;
  const caption = document.createElement("span");
  caption.className = "caption";
  caption.textContent = entryText(job);
  button.append(img, caption);
  button.addEventListener("click", () => openViewer(result.image_id, job.warnings));
  item.append(button);
  if (upscalerCard && job.status === "succeeded") item.append(upscaleButton(result, img.alt));
  if (FINISHED.has(job.status)) item.append(deleteButton(job, img.alt));
  return item;
}

// What a history entry's caption says: the prompt, and for an upscale job its factor first.
function entryText(job) {
  if (job.request.kind !== "upscale") return job.request.prompt;
  const factor = job.request.scale ?? job.request.upscaler_scale;
  return `Upscaled x${factor}${job.request.prompt ? `: ${job.request.prompt}` : ""}`;
}

function statusItem(job) {
  const item = document.createElement("li");
  item.className = `placeholder ${job.status}`;
  item.dataset.job = job.id;
  const text = document.createElement("span");
  text.textContent = `${job.status}: ${entryText(job)}`;
  if (job.error) text.title = job.error.message;
  item.append(text);
  if (FINISHED.has(job.status)) item.append(deleteButton(job, text.textContent));
  return item;
}

// -- upscaling a history image: POST /v1/jobs/upscales ---------------------------------------------

// The server's upscale model: the Upscale buttons and the hires fix's upscaler choice, only where it has one.
function showUpscaler(card) {
  const changed = JSON.stringify(card) !== JSON.stringify(upscalerCard);
  upscalerCard = card;
  $("hires-upscaler-row").hidden = !card;
  $("edit-upscaler-row").hidden = !card;
  for (const select of [$("hires_upscaler"), $("edit-upscaler")]) {
    const chosen = select.value;
    select.replaceChildren(new Option("Lanczos", ""), ...(card ? [new Option(`${card.name} (x${card.scale})`, card.name)] : []));
    select.value = card && chosen === card.name ? chosen : "";
  }
  // The buttons come and go with it (the first listing comes after the model card: see the start).
  if (changed && galleryShown) loadGallery(true).catch((err) => setError(err.message));
}

// A finished image's Upscale button, named after what it shows.
function upscaleButton(result, name) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "upscale";
  button.textContent = "Upscale";
  button.title = upscalerCard ? `Enlarge with ${upscalerCard.name} (x${upscalerCard.scale})` : "";
  button.setAttribute("aria-label", `Upscale ${name}`);
  button.addEventListener("click", () => upscaleEntry(result));
  return button;
}

// The image's PNG (with its record, which the upscale keeps) goes to POST /v1/jobs/upscales at the model's
// own factor; the job is followed as any other and its picture joins the history.
async function upscaleEntry(result) {
  if ($("generate-button").disabled) {  // one job at a time from this page
    setError("Wait for the running job to finish (or cancel it) before upscaling.");
    return;
  }
  try {
    const response = await api(result.url);
    if (!response.ok) throw new Error(`image: ${response.status}`);
    const form = new FormData();
    form.append("image", new File([await response.blob()], `pictor-${result.image_id}.png`, { type: "image/png" }));
    await submit(form, "/v1/jobs/upscales");
  } catch (err) {
    setError(err.message);
  }
}

// -- deleting a history entry: DELETE /v1/history/{id} -----------------------------------------------

// A finished job's entry (each of its thumbnails) has a Delete button, named after what it shows.
function deleteButton(job, name) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "delete";
  button.textContent = "Delete";
  button.setAttribute("aria-label", `Delete ${name} from the history`);
  button.addEventListener("click", () => deleteEntry(job, button));
  return button;
}

// The job goes with all its images and the pictures uploaded for it, so the page asks first. An entry the
// server no longer has (404: deleted elsewhere) leaves the list too; any other refusal (409: its cancelled
// run has not stopped yet) keeps it, with the server's message.
async function deleteEntry(job, button) {
  const count = job.results.length;
  const images = count === 1 ? ", with its image" : count > 1 ? `, with its ${count} images` : "";
  const prompt = entryText(job) ? `"${entryText(job)}"` : "this job";
  if (!window.confirm(`Delete ${prompt} from the history${images}? This cannot be undone.`)) return;
  const hadFocus = document.activeElement === button;
  setError("");
  button.disabled = true;
  try {
    const response = await api(`/v1/history/${encodeURIComponent(job.id)}`, { method: "DELETE" });
    const body = await response.json().catch(() => ({}));
    if (response.ok || response.status === 404) removeEntry(job.id, hadFocus);
    if (!response.ok) throw new Error(errorMessage(response, body));
    setStatus(`Deleted ${prompt} from the history.`);
  } catch (err) {
    setError(err.message);
  } finally {
    button.disabled = false;
    if (hadFocus && button.isConnected) button.focus();
  }
}

// Every thumbnail of the job leaves the list. Focus, if it was on the Delete button, goes to the entry that
// took its place (or the one before it), or to the search box when none is left.
function removeEntry(jobId, hadFocus) {
  const items = [...$("gallery").children].filter((item) => item.dataset.job === jobId);
  if (!items.length) return;
  const neighbour = items.at(-1).nextElementSibling || items[0].previousElementSibling;
  for (const item of items) item.remove();
  galleryOffset = Math.max(0, galleryOffset - 1); // one job fewer before "Show more"'s next page
  $("gallery-empty").hidden = $("gallery").children.length > 0;
  if (hadFocus) ((neighbour && neighbour.querySelector("button")) || $("search")).focus();
}

// -- the viewer ------------------------------------------------------------------------------------

async function openViewer(imageId, warnings) {
  try {
    const meta = await apiJSON(`/v1/images/${imageId}/metadata`);
    viewed = meta;
    $("viewer-image").src = meta.url;
    $("viewer-image").alt = meta.record.prompt || "generated image";
    $("viewer-title").textContent = meta.record.prompt || "Image";
    // an upscale keeps its source's A1111 text and adds the Extras tab's (none for a foreign picture)
    $("viewer-parameters").textContent = [meta.parameters, meta.postprocessing].filter(Boolean).join("\n");
    showWarnings($("viewer-warnings"), warnings);
    $("viewer-record").textContent = JSON.stringify(meta.record, null, 2);
    // An edit is reproduced from its source image, which this page does not keep: no button for it.
    // Nor an upscale, which `pictor reproduce IMAGE` runs again (with --source for a picture pictor did not
    // make).
    $("reproduce-button").hidden = Boolean(meta.record.source_image || meta.record.upscale);
    $("download-link").href = meta.url;
    $("download-link").download = `pictor-${meta.seed}.png`;
    $("viewer").showModal();
  } catch (err) {
    setError(err.message);
  }
}

// The viewed PNG becomes the picture an edit or a variation starts from (`kind`): a File in that
// section's file input, as if the user had picked it.
async function useViewed(kind) {
  const oldMask = $("edit-mask").files[0];
  const response = await api(viewed.url);
  if (!response.ok) throw new Error(`image: ${response.status}`);
  const file = new File([await response.blob()], `pictor-${viewed.seed}.png`, { type: "image/png" });
  const files = new DataTransfer();
  files.items.add(file);
  $(kind === "edit" ? "edit-image" : "variation-image").files = files.files;
  // The old picture's mask goes with it, but not a mask picked while this picture loaded: that one is for it.
  if (kind === "edit" && $("edit-mask").files[0] === oldMask) $("edit-mask").value = "";
  $(kind === "edit" ? "edit-settings" : "variation-settings").open = true;
  choosePicture(kind);
}

function recordRequest(record) {
  const body = {
    prompt: record.prompt,
    size: `${record.width}x${record.height}`,
    steps: record.steps,
    guidance: record.guidance,
    sampler: record.sampler,
    seed: record.seed,
    n: 1,
  };
  if (record.negative_prompt) body.negative_prompt = record.negative_prompt;
  if (record.prompt_weights) body.prompt_weights = true;
  if (record.prompt_editing) body.prompt_editing = true;
  if (record.composable) body.composable = true;
  if (record.schedule) body.schedule = record.schedule;
  if (record.guidance_method) body.guidance_method = record.guidance_method;
  if (record.layout) body.layout = record.layout;
  if (record.regions) body.regions = record.regions;
  if (record.regions && record.regional_attention) {
    body.regional_attention = true;
    for (const name of REGIONAL_OPTIONS) if (record[name] !== undefined) body[name] = record[name];
  }
  if (record.cache_threshold) body.cache_threshold = record.cache_threshold;
  if (record.variation_strength) {  // this image's own variation seed: with n = 1, the same noise
    body.variation_strength = record.variation_strength;
    body.variation_seed = record.variation_seed;
  }
  if (record.seed_resize_from) body.seed_resize_from = record.seed_resize_from.join("x");
  if (record.denoise_tile) {  // recorded together: the overlap is the one that ran
    body.denoise_tile = record.denoise_tile;
    body.denoise_tile_overlap = record.denoise_tile_overlap;
  }
  if (record.hires) {  // the record's size is the first pass's; the hires fix is its own part
    body.hires_scale = record.hires.scale;
    body.hires_strength = record.hires.strength;
    body.hires_steps = record.hires.steps;
    if (record.hires.upscaler && record.hires.upscaler !== "lanczos") body.hires_upscaler = record.hires.upscaler;
  }
  if (record.loras && record.loras.length) {
    body.loras = record.loras.map((entry) => ({ name: entry.name, scale: entry.scale }));
  }
  return body;
}

// -- start -----------------------------------------------------------------------------------------

async function loadModel() {
  try {
    const models = await apiJSON("/v1/models");
    const card = models.data[0];
    // The sampler and schedule selects, each with "model default" (sends nothing) first.
    for (const [id, names] of [["sampler", card.samplers], ["schedule", card.schedules || []]]) {
      const select = $(id);
      const chosen = select.value; // kept when the card is read again while the model loads
      const placeholder = new Option("model default", "");
      select.replaceChildren(placeholder, ...names.map((s) => new Option(s, s)));
      select.value = chosen;
    }
    const d = card.defaults || {};
    $("model-info").textContent =
      `Model ${card.id}${card.trained === false && !card.id.includes("untrained") ? " (untrained)" : ""}` +
      (card.trained === false ? ": random weights, expect noise" : "") +
      (d.width ? `, default ${d.width}x${d.height}, ${d.steps} steps` : "") +
      (card.ready ? "" : " (loading…)") +
      (card.fill ? ". FLUX.1 Fill: it repaints the masked part of a picture (Edit, with a mask)" : "") +
      (CONTROL_WORDS[card.control]
        ? `. ${CONTROL_WORDS[card.control][0]}: it follows a control picture, ${CONTROL_WORDS[card.control][1]} (Control picture)`
        : "") +
      (card.redux ? ". FLUX.1 Redux: a picture can prompt the images (Redux picture), and variations draw from it" : "") +
      (card.ip_adapter ? ". IP-Adapter: a picture can lend the images its look (IP-Adapter picture)" : "") +
      ((card.controlnets || []).length
        ? `. FLUX.1 ControlNets: ${card.controlnets.map((c) => c.name).join(", ")} (ControlNet pictures)`
        : "") +
      (card.upscaler
        ? `. Upscale model ${card.upscaler.name} (x${card.upscaler.scale}): Upscale under a history image, or the hires fix's upscaler`
        : "");
    fillModel = Boolean(card.fill);
    for (const [id, key] of [["width", "width"], ["height", "height"], ["steps", "steps"], ["guidance", "guidance"]]) {
      if (d[key] !== undefined) $(id).placeholder = String(d[key]);
    }
    const multiple = card.limits.size_multiple || 1;
    // The step counts from min: with min 1, a multiple of 4 such as 32 would be invalid (29, 33 are not).
    for (const id of ["width", "height"]) Object.assign($(id), { min: multiple, step: multiple });
    $("n").max = card.limits.max_images;
    $("steps").max = card.limits.max_steps;
    // A context picture means something only to a FLUX.1 Kontext model (others refuse it): offered only then.
    $("context-settings").hidden = !card.kontext;
    $("context-image").disabled = !card.kontext;
    // Likewise a control picture (FLUX.1 Canny / Depth, which need one: open from the start), and the Canny
    // options only for a Canny model (a Depth model refuses them).
    const kind = CONTROL_WORDS[card.control] ? card.control : null;
    if (kind && kind !== controlKind) $("control-settings").open = true;
    controlKind = kind;
    $("control-settings").hidden = !kind;
    $("control-image").disabled = !kind;
    if (kind) $("control-summary").textContent = `Control picture (${CONTROL_WORDS[kind][0]})`;
    $("canny-options").hidden = kind !== "canny";
    for (const id of ["control-canny", "canny-low", "canny-high"]) $(id).disabled = kind !== "canny";
    // A Redux picture only where the server has FLUX.1 Redux (others refuse it); a variation is then drawn
    // from the picture's Redux tokens, which takes no img2img strength.
    reduxModel = Boolean(card.redux);
    $("redux-settings").hidden = !reduxModel;
    for (const id of ["redux-image", "redux-strength"]) $(id).disabled = !reduxModel;
    $("variation-strength").disabled = reduxModel;
    $("variation-redux-help").hidden = !reduxModel;
    // An IP-Adapter picture only where the server has XLabs' IP-Adapter loaded (others refuse it).
    ipAdapterModel = Boolean(card.ip_adapter);
    $("ip-adapter-settings").hidden = !ipAdapterModel;
    for (const id of ["ip-adapter-image", "ip-adapter-scale"]) $(id).disabled = !ipAdapterModel;
    showControlNets(card.controlnets || []);
    showUpscaler(card.upscaler || null);
    if (!card.ready) {
      // The server answers while its model loads: ask again until it is ready, or say why it never will be.
      const health = await api("/readyz").then((r) => r.json()).catch(() => ({}));
      if (health.status === "error") {
        $("model-info").textContent = `Model ${card.id} (failed to load)`;
        setError(health.detail);
      } else {
        setTimeout(loadModel, 1000);
      }
    }
  } catch (err) {
    setError(err.message);
  }
}

document.addEventListener("DOMContentLoaded", async () => {
  $("generate-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = requestFromForm();
    const mode = formMode();
    if (fillModel && mode !== "edit") {  // the server would refuse it: say what the model needs here
      setError("This is a FLUX.1 Fill model: it repaints the masked part of a picture. Choose a source image and a mask under Edit.");
      return;
    }
    if (controlKind && (mode === "variation" || !controlFile())) {  // the server would refuse it: say what the model needs here
      const [model, picture] = CONTROL_WORDS[controlKind];
      setError(
        mode === "variation"
          ? `This is a ${model} model: every image needs a control picture, which variations do not take. Use Generate or Edit with one.`
          : `This is a ${model} model: it draws what a control picture shows. Choose one under Control picture: ${picture}.`,
      );
      return;
    }
    let nets = null;  // the ControlNets' pictures and settings, where the server has ControlNets
    if (controlnetCards.length) {  // the server would refuse an image without their pictures: said here
      nets = mode === "variation"
        ? { error: "This server has FLUX.1 ControlNets: every image needs their pictures, which variations do not take. Use Generate or Edit with them." }
        : controlnetChoices();
      if (nets.error) {
        setError(nets.error);
        return;
      }
    }
    if (mode === "variation" && reduxFile()) {  // the variation's own picture is its Redux picture
      setError("A variation's picture is its Redux picture: clear the Redux picture to make variations, or clear the variation picture to generate from the Redux picture.");
      return;
    }
    if (mode === "variation" && ipAdapterFile()) {  // the variation form takes no IP-Adapter picture
      setError("Variations do not take an IP-Adapter picture: clear the IP-Adapter picture to make variations, or clear the variation picture to generate with it.");
      return;
    }
    const reference = $("reference-image").files.length > 0 || reduxFile() !== null || ipAdapterFile() !== null;
    if (!body.prompt.trim() && !reference && mode !== "variation") {  // a variation's picture is enough
      const pictures = ["a reference", reduxModel ? "Redux" : null, ipAdapterModel ? "IP-Adapter" : null].filter(Boolean);
      const which = pictures.length > 1 ? `${pictures.slice(0, -1).join(", ")} or ${pictures.at(-1)}` : pictures[0];
      setError(`Write a prompt (or choose ${which} picture).`);
      return;
    }
    const layout = boxesFromForm("layout");
    const regions = boxesFromForm("regions");
    if (layout.error || regions.error) {
      setError(layout.error || regions.error);
      return;
    }
    if (layout.items) body.layout = layout.items;
    if (regions.items) body.regions = regions.items;
    // regional attention is a way to run regions: sent only with them (the server refuses it alone), and
    // its Regional-Prompting-FLUX options only with it (likewise)
    if (regions.items && $("regional_attention").checked) {
      body.regional_attention = true;
      Object.assign(body, regionalOptionsFromForm());
    }
    try {
      if (mode === "variation") submit(variationFromForm(body), "/v1/jobs/variations");
      else if (mode === "edit") submit(editFromForm(body, nets), "/v1/jobs/edits");
      else submit(await withReference(body, nets));
    } catch (err) {
      setError(err.message);
    }
  });
  $("add-box-button").addEventListener("click", () => addBox("layout"));
  $("add-region-button").addEventListener("click", () => addBox("regions"));
  $("reread-loras-button").addEventListener("click", async () => {
    setError("");
    try {
      await loadLoras(await apiJSON("/v1/loras/refresh", { method: "POST" }));
    } catch (err) {
      setError(err.message);
    }
  });
  $("clear-layout-button").addEventListener("click", () => fillBoxes("layout", []));
  $("clear-regions-button").addEventListener("click", () => fillBoxes("regions", []));
  $("clear-reference-button").addEventListener("click", () => {
    $("reference-image").value = "";
  });
  $("clear-context-button").addEventListener("click", () => {
    $("context-image").value = "";
  });
  $("clear-control-button").addEventListener("click", () => {
    $("control-image").value = "";
  });
  $("clear-redux-button").addEventListener("click", () => {
    $("redux-image").value = "";
  });
  $("clear-ip-adapter-button").addEventListener("click", () => {
    $("ip-adapter-image").value = "";
  });
  $("clear-controlnet-button").addEventListener("click", () => {
    for (const input of document.querySelectorAll("#controlnet-list input[type=file]")) input.value = "";
  });
  // Prompt editing reads A1111's syntax, whose weights are part of it (as --prompt-editing implies
  // --prompt-weights): checking it checks Prompt weights, and unchecking those unchecks it.
  $("prompt_editing").addEventListener("change", () => {
    if ($("prompt_editing").checked) $("prompt_weights").checked = true;
  });
  $("prompt_weights").addEventListener("change", () => {
    if (!$("prompt_weights").checked) $("prompt_editing").checked = false;
  });
  $("guidance_method").addEventListener("change", showGuidanceMethod);
  showGuidanceMethod();
  $("edit-image").addEventListener("change", () => choosePicture("edit"));
  $("variation-image").addEventListener("change", () => choosePicture("variation"));
  $("clear-edit-button").addEventListener("click", () => {
    $("edit-image").value = "";
    $("edit-mask").value = "";
    showMode();
  });
  $("clear-variation-button").addEventListener("click", () => {
    $("variation-image").value = "";
    showMode();
  });
  for (const [button, kind] of [["edit-this-button", "edit"], ["vary-this-button", "variation"]]) {
    $(button).addEventListener("click", async () => {
      if (!viewed) return;
      try {
        await useViewed(kind);
        $("viewer").close();
        $("prompt").focus();
      } catch (err) {
        setError(err.message);
      }
    });
  }
  $("cancel-button").addEventListener("click", async () => {
    if (!currentJob) return;
    try {
      await apiJSON(`/v1/jobs/${currentJob}`, { method: "DELETE" });
    } catch (err) {
      setError(err.message);
    }
  });
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    loadGallery(true).catch((err) => setError(err.message));
  });
  $("more-button").addEventListener("click", () => loadGallery(false).catch((err) => setError(err.message)));
  $("close-button").addEventListener("click", () => $("viewer").close());
  $("settings-image").addEventListener("change", () => {
    const file = $("settings-image").files[0];
    if (file) settingsFromImage(file).catch((err) => setError(err.message));
  });
  $("reuse-button").addEventListener("click", async () => {
    if (!viewed) return;
    const shown = viewed;
    fillForm(shown.record);
    $("viewer").close();
    $("prompt").focus();
    // A variation's record reads like an img2img edit's: only its job says it was a variation, whose
    // strength belongs in the Variations section, not the edit's.
    let variation = false;
    try {
      variation = Boolean((await apiJSON(`/v1/jobs/${shown.job_id}`)).request.variation);
    } catch (err) {
      // the job is gone from the history: its record is taken as an edit's
    }
    fillEditSettings(variation ? {} : shown.record);
    if (variation) {
      $("variation-strength").value = shown.record.strength ?? "";
      $("variation-settings").open = true;
    }
  });
  $("reproduce-button").addEventListener("click", () => {
    if (!viewed) return;
    $("viewer").close();
    if (viewed.record.reference_image) {
      // The record keeps only the picture's hash; `pictor reproduce IMAGE --reference PICTURE` checks it.
      setError("This image was made from a reference picture, which the page does not keep: use Reuse " +
        "settings and choose the same picture under Reference picture.");
      return;
    }
    if (viewed.record.context_image) {
      // Likewise a FLUX.1 Kontext context image: without it the same settings would make another image.
      setError("This image was made from a context image (FLUX.1 Kontext), which the page does not keep: " +
        "use Reuse settings and choose the same picture under Context picture, or run " +
        "`pictor reproduce IMAGE --context PICTURE`.");
      return;
    }
    if (viewed.record.control_image) {
      // And a FLUX.1 Canny / Depth control picture: Reuse settings brings back its Canny thresholds.
      setError("This image was made from a control picture (FLUX.1 Canny / Depth), which the page does not " +
        "keep: use Reuse settings and choose the same picture under Control picture, or run " +
        "`pictor reproduce IMAGE --control PICTURE`.");
      return;
    }
    if (viewed.record.redux_image) {
      // And a FLUX.1 Redux picture (a variation's too): Reuse settings brings back its strength.
      setError("This image was made from a Redux picture (FLUX.1 Redux), which the page does not keep: use " +
        "Reuse settings and choose the same picture under Redux picture, or run " +
        "`pictor reproduce IMAGE --redux PICTURE`.");
      return;
    }
    if (viewed.record.ip_adapter_image) {
      // And an IP-Adapter picture: Reuse settings brings back its scale.
      setError("This image was made from an IP-Adapter picture, which the page does not keep: use Reuse " +
        "settings and choose the same picture under IP-Adapter picture, or run " +
        "`pictor reproduce IMAGE --ip-adapter PICTURE`.");
      return;
    }
    if (viewed.record.controlnets) {
      // And the ControlNets' pictures: Reuse settings brings back their scales, modes and window.
      setError("This image was made from ControlNet pictures, which the page does not keep: use Reuse " +
        "settings and choose the same pictures under ControlNet pictures, or run " +
        "`pictor reproduce IMAGE --controlnet-image PICTURE ...`.");
      return;
    }
    submit(recordRequest(viewed.record));
  });
  await loadModel();
  await loadLoras().catch((err) => setError(err.message));
  await loadGallery(true).catch((err) => setError(err.message));
});


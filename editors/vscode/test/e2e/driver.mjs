// Playwright driver of the VS Code end-to-end test: run.sh installs everything, starts
// code-server with the packaged extension, then runs `node driver.mjs`, which drives VS Code
// in Chromium through the keyboard, like a user, and reads the results back from the saved
// file and from the LSP trace (dgemma.trace.server = verbose, the dgemma output channel).
//
//   node driver.mjs --prepare   writes the workspace file and the settings (run.sh does it)
//   node driver.mjs --list      the case names (E2E_CASES / run.sh arguments pick some)
//
// The bundled model writes word salad: the cases check shapes and invariants (lines outside a
// selection byte-identical, what follows a selection keeps its line), never the generated text.
import * as fs from "node:fs";
import * as path from "node:path";
import { createRequire } from "node:module";

const env = process.env;
const WS = env.E2E_WORKSPACE ?? ".";
const FILE = path.join(WS, "stats.py");
const WS_SETTINGS = path.join(WS, ".vscode", "settings.json");
const SHOTS = path.join(env.E2E_ARTIFACTS ?? ".", "screenshots");

// Lines are numbered from 0, as in LSP; VS Code shows them from 1 (Ctrl+G takes those).
const ORIGINAL = [
  '"""Small statistics helpers."""', //                     0
  "", //                                                       1
  "", //                                                       2
  "def mean(values):", //                                      3
  "    total = 0", //                                          4  4:0-8:0: palette rewrite, code action
  "    for v in values:", //                                   5
  "        total += v", //                                     6
  "    return total / len(values)", //                         7
  "", //                                                       8
  "", //                                                       9
  "def variance(values):", //                                 10
  "    m = mean(values)", //                                  11  ghost text on a new line after it
  "    squares = [(v - m) ** 2 for v in values]", //          12  12:4-14:4: indented selection
  "    total = sum(squares)", //                              13  13:0-14:0: empty rewrite
  "    count = len(values)", //                               14
  "    return total / count", //                              15
  "", //                                                      16
  "", //                                                      17
  "def describe(values):", //                                 18
  "    m = mean(values)", //                                  19
  "    ", //                                                  20  explicit trigger at 20:4
  '    return {"mean": m, "variance": variance(values)}', //  21
  "",
].join("\n");

function userSettings() {
  return {
    // `python -m dgemma.lsp` puts its working directory first on sys.path: the workspace's
    // kernels/ and dgemma/ folders would break it if the server ran there (bug 4).
    "dgemma.serverCommand": [env.E2E_PYTHON, "-m", "dgemma.lsp"],
    "dgemma.trace.server": "verbose",
    "dgemma.debounceMs": 50,
    "files.autoSave": "off",
    "editor.quickSuggestions": { other: "off", comments: "off", strings: "off" },
    "editor.wordBasedSuggestions": "off",
    "editor.suggestOnTriggerCharacters": false,
    "editor.parameterHints.enabled": false,
    "editor.hover.enabled": false,
    "editor.minimap.enabled": false,
    "editor.lightbulb.enabled": "off",
    "workbench.startupEditor": "none",
    "workbench.tips.enabled": false,
    "workbench.enableExperiments": false,
    "workbench.editor.enablePreview": false,
    "chat.disableAIFeatures": true,
    "telemetry.telemetryLevel": "off",
    "extensions.autoUpdate": false,
    "extensions.autoCheckUpdates": false,
    "extensions.ignoreRecommendations": true,
    "update.mode": "none",
    "security.workspace.trust.enabled": false,
    "remote.autoForwardPorts": false,
    "git.enabled": false,
    "workbench.secondarySideBar.defaultVisibility": "hidden",
  };
}

/** One case's settings go to the workspace's .vscode/settings.json, which VS Code watches. */
function writeWorkspaceSettings(values = {}) {
  fs.mkdirSync(path.dirname(WS_SETTINGS), { recursive: true });
  fs.writeFileSync(WS_SETTINGS, JSON.stringify(values, null, 2));
}

if (process.argv.includes("--prepare")) {
  fs.writeFileSync(FILE, ORIGINAL);
  fs.writeFileSync(env.E2E_SETTINGS, JSON.stringify(userSettings(), null, 2));
  writeWorkspaceSettings();
  process.exit(0);
}

const t0 = Date.now();
const log = (...a) => console.log(`[e2e +${((Date.now() - t0) / 1000).toFixed(1)}s]`, ...a);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const lines = (text) => text.split("\n");
/** Offset of an LSP position in ORIGINAL. */
const at = (line, character) => lines(ORIGINAL).slice(0, line).reduce((n, l) => n + l.length + 1, 0) + character;
const blank = (s) => typeof s === "string" && s.trim() === "";
class Failure extends Error {}
function check(ok, message) {
  if (!ok) throw new Failure(message);
}
async function until(what, timeoutMs, probe, everyMs = 150) {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe();
    if (v) return v;
    if (Date.now() > end) throw new Failure(`timed out after ${timeoutMs / 1000} s waiting for ${what}`);
    await sleep(everyMs);
  }
}

// ---- the LSP trace: vscode-languageclient writes it to the dgemma output channel's log file --
const LOGS = path.join(env.E2E_RUN_DIR ?? ".", "user-data", "logs");
function traceText() {
  const files = [];
  const walk = (dir) => {
    for (const e of fs.existsSync(dir) ? fs.readdirSync(dir, { withFileTypes: true }) : []) {
      const p = path.join(dir, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.name === "dgemma.log" && path.basename(dir) === "dgemma.dgemma") files.push(p);
    }
  };
  walk(LOGS);
  return files.map((p) => fs.readFileSync(p, "utf8")).join("\n");
}
/** Trace entries: {head: "Received response 'workspace/executeCommand - (4)' in 12ms.", body}. */
function trace() {
  const out = [];
  for (const chunk of traceText().split(/^(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ \[)/m)) {
    const m = /^\S+ \S+ \[\w+\] (.*)\n(?:(?:Params|Result): )?([\s\S]*)$/.exec(chunk.trimEnd() + "\n");
    if (!m) continue;
    let body;
    try {
      body = m[2].trim() ? JSON.parse(m[2]) : undefined;
    } catch {
      body = m[2].trim();
    }
    out.push({ head: m[1], body });
  }
  return out;
}
const isA = (e, kind, method) => e.head.startsWith(`${kind} '${method}`);

/** The settings last sent to the server (initialization options or didChangeConfiguration). */
function serverSettings() {
  const sent = trace().filter((e) => isA(e, "Sending notification", "workspace/didChangeConfiguration"));
  return sent.length ? sent[sent.length - 1].body?.settings?.dgemma : undefined;
}

// ---- VS Code, through the keyboard and the DOM ------------------------------------------------
let page;
const STATUS = "#dgemma\\.dgemma\\.dgemma\\.status"; // the extension's status bar item
const INPUT = ".quick-input-widget .quick-input-box input";

async function statusLabel() {
  return (await page.locator(STATUS).getAttribute("aria-label", { timeout: 2000 }).catch(() => null)) ?? "";
}
async function palette(command) {
  await page.keyboard.press("F1");
  await page.locator(INPUT).waitFor({ state: "visible" });
  await page.locator(INPUT).fill(`>${command}`);
  const row = page.locator(".quick-input-widget .monaco-list-row", { hasText: command }).first();
  await row.waitFor({ state: "visible" });
  await sleep(100);
  await page.keyboard.press("Enter");
}
async function quickInputGone() {
  await page.locator(".quick-input-widget").waitFor({ state: "hidden" }).catch(() => {});
}
/** The cursor to a line and column counted from 1, as a user does with Ctrl+G. */
async function goTo(line1, col1) {
  await page.keyboard.press("Control+G");
  await page.locator(INPUT).waitFor({ state: "visible" });
  await page.locator(INPUT).fill(`:${line1}:${col1}`);
  await sleep(100);
  await page.keyboard.press("Enter");
  await quickInputGone();
}
const dirty = async () => (await page.locator(".tabs-container .tab.dirty").count()) > 0;
/** The document as VS Code has it: saved with Ctrl+S, read back from disk. */
async function readDocument() {
  await page.keyboard.press("Control+S");
  await until("the save", 10_000, async () => !(await dirty()));
  await sleep(200);
  return fs.readFileSync(FILE, "utf8");
}
async function toasts() {
  return page.locator(".notifications-toasts .notification-list-item-message").allInnerTexts().catch(() => []);
}
/** Before each case: the file as at the start, on disk and in the editor, and the case's settings. */
async function restore(caseSettings = {}) {
  await page.keyboard.press("Escape");
  await palette("Notifications: Clear All Notifications");
  await quickInputGone();
  const wanted = JSON.stringify(caseSettings, null, 2);
  if (fs.readFileSync(WS_SETTINGS, "utf8") !== wanted) {
    writeWorkspaceSettings(caseSettings);
    const keys = Object.keys(caseSettings).map((k) => k.replace(/^dgemma\./, ""));
    await until("the case's settings to reach the server", 30_000, () => {
      const s = serverSettings();
      return s && keys.every((k) => JSON.stringify(s[k]) === JSON.stringify(caseSettings[`dgemma.${k}`]));
    });
  }
  // VS Code may have auto-saved an edit the server applied (workspace/applyEdit): write the
  // file back, then revert the editor to it.
  fs.writeFileSync(FILE, ORIGINAL);
  await palette("File: Revert File");
  await quickInputGone();
  await sleep(300);
  await palette("View: Focus Active Editor Group");
  await quickInputGone();
  check(fs.readFileSync(FILE, "utf8") === ORIGINAL && !(await dirty()), "the workspace file could not be restored");
}
async function openFile() {
  await page.keyboard.press("Control+P");
  await page.locator(INPUT).waitFor({ state: "visible" });
  await page.locator(INPUT).fill("stats.py");
  await page.locator(".quick-input-widget .monaco-list-row", { hasText: "stats.py" }).first().waitFor();
  await sleep(200);
  await page.keyboard.press("Enter");
  await page.locator(".tabs-container .tab", { hasText: "stats.py" }).waitFor();
  await page.locator(".monaco-editor .view-lines").first().waitFor();
  await sleep(300);
}
async function ghostText() {
  const g = page.locator(".monaco-editor .ghost-text-decoration, .monaco-editor .ghost-text-decoration-preview, .monaco-editor .ghost-text");
  return (await g.count()) > 0 ? (await g.allInnerTexts()).join("⏎") : "";
}
/**
 * Waits for ghost text after an action that asks for it; undefined when the server answered
 * with nothing (the bundled model may have nothing to say at one spot: callers retry).
 */
async function awaitSuggestion(before, timeoutMs = 90_000) {
  const end = Date.now() + timeoutMs;
  let answeredAt;
  while (Date.now() < end) {
    const g = await ghostText();
    if (g.trim()) return g;
    const responses = trace().filter((e) => isA(e, "Received response", "textDocument/inlineCompletion"));
    if (answeredAt === undefined && responses.length > before) answeredAt = Date.now();
    if (answeredAt !== undefined && Date.now() - answeredAt > 3000) return undefined;
    await sleep(100);
  }
  throw new Failure(`no inline completion answer within ${timeoutMs / 1000} s`);
}
const inlineResponses = () => trace().filter((e) => isA(e, "Received response", "textDocument/inlineCompletion")).length;
const inlineRequests = () => trace().filter((e) => isA(e, "Sending request", "textDocument/inlineCompletion"));

/**
 * "dgemma: Rewrite selection" from the command palette on the current selection, with
 * `instruction`; resolves once the server answered. Returns the server's answer to the command
 * and the replacement texts it asked VS Code to apply (workspace/applyEdit).
 */
async function rewrite(instruction) {
  const before = trace().length;
  await palette("dgemma: Rewrite selection");
  await page.locator(INPUT).waitFor({ state: "visible" });
  await page.locator(INPUT).fill(instruction);
  await page.keyboard.press("Enter");
  await quickInputGone();
  const result = await until("the server's answer to dgemma.rewrite", 120_000, () => {
    const r = trace().slice(before).find((e) => isA(e, "Received response", "workspace/executeCommand"));
    return r && { body: r.body ?? null };
  });
  const edits = trace().slice(before).filter((e) => isA(e, "Received request", "workspace/applyEdit"))
    .flatMap((e) => (e.body?.edit?.documentChanges ?? []).flatMap((c) => c.edits ?? [])
      .concat(Object.values(e.body?.edit?.changes ?? {}).flat()))
    .map((e) => e.newText);
  await sleep(500); // the extension shows its message after the answer
  return { result: result.body, edits, said: JSON.stringify({ result: result.body, applyEdit: edits }) };
}
/** Selects with the keyboard: Ctrl+G to the start, then Shift+Down `downs` times. */
async function select(line1, col1, downs, { home = false } = {}) {
  await goTo(line1, col1);
  if (home) await page.keyboard.press("Home");
  for (let i = 0; i < downs; i++) await page.keyboard.press("Shift+ArrowDown");
}
async function shot(name) {
  await page.screenshot({ path: path.join(SHOTS, `${name}.png`) }).catch(() => {});
}
/** The part of `doc` that replaced ORIGINAL[start, end); fails if anything outside it changed. */
function replaced(doc, start, end, what) {
  const head = ORIGINAL.slice(0, start);
  const tail = ORIGINAL.slice(end);
  check(doc.startsWith(head), `${what}: the text before the selection changed:\n${doc}`);
  check(doc.endsWith(tail) && doc.length >= head.length + tail.length,
    `${what}: the text after the selection changed:\n${doc}`);
  return doc.slice(head.length, doc.length - tail.length);
}
/** A server answer that applied a real (non-blank) replacement. */
const appliedText = (r) => r.result?.applied === true && typeof r.result.text === "string" && !blank(r.result.text);
/** A server answer saying the model gave nothing: refused by the server or by the extension. */
const emptyAnswer = (r) => r.result?.applied === false &&
  (blank(r.result.text) || r.result.error === "empty" || /nothing|empty/i.test(r.result.message ?? ""));
const SEEDS = [0, 1, 2, 3, 4, 5, 6, 7];

/**
 * Runs a rewrite with seeds 0, 1, … (dgemma.seed) until `count` of the server's answers were
 * of the kind the case needs (`want`), and checks each of those with `verify` before the next
 * try; other answers are undone. Fixed seeds: a rerun asks the model the same questions.
 */
async function rewriteWithSeeds(what, { want, select: doSelect, instruction, settings = {}, count = 1, verify }) {
  const tried = [];
  let found = 0;
  for (const seed of SEEDS) {
    await restore({ ...settings, "dgemma.seed": seed });
    await doSelect();
    const r = await rewrite(instruction);
    tried.push(`seed ${seed}: ${r.said}`);
    log(`${what}, seed ${seed}: server said ${r.said}`);
    if (!want(r)) continue;
    await verify({ ...r, seed });
    if (++found === count) return;
  }
  throw new Failure(`${what}: ${found} of the ${count} answers this case needs in ${SEEDS.length} seeds:\n  ${tried.join("\n  ")}`);
}

// ---- the cases ---------------------------------------------------------------------------------
const CASES = {};

CASES["ready"] = async () => {
  // The workspace has top-level kernels/ and dgemma/ folders that shadow the installed packages
  // when `python -m dgemma.lsp` runs in it (bug 4): "ready" means the server runs elsewhere.
  let label = "";
  await until("the status bar to say ready", 300_000, async () => {
    label = await statusLabel();
    if (label.startsWith("dgemma failed")) throw new Failure(`status bar: ${label}`);
    return label.startsWith("dgemma ready");
  }, 250).catch((e) => {
    throw new Failure(`${e.message}; status bar: "${label}"`);
  });
  log(`status bar: ${label}`);
  // And directly: the working directory of this run's `dgemma lsp` (found by its environment).
  const servers = [];
  for (const pid of fs.readdirSync("/proc").filter((p) => /^\d+$/.test(p))) {
    try {
      const cmd = fs.readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0");
      if (!cmd.includes("dgemma.lsp")) continue;
      const environ = fs.readFileSync(`/proc/${pid}/environ`, "utf8").split("\0");
      if (!environ.includes(`DGEMMA_RUNTIME_DIR=${env.DGEMMA_RUNTIME_DIR}`)) continue;
      servers.push({ pid, cwd: fs.readlinkSync(`/proc/${pid}/cwd`), safePath: environ.includes("PYTHONSAFEPATH=1") });
    } catch {} // gone meanwhile, or not ours to read
  }
  log(`dgemma lsp: ${JSON.stringify(servers)}`);
  check(servers.length === 1, `expected one dgemma lsp of this run, found ${servers.length}`);
  const rel = path.relative(WS, servers[0].cwd);
  check(rel.startsWith("..") || path.isAbsolute(rel), `dgemma lsp runs in the workspace (${servers[0].cwd})`);
};

CASES["ghost-text"] = async () => {
  await restore();
  const cut = at(11, lines(ORIGINAL)[11].length); // end of `    m = mean(values)`
  let g;
  for (let attempt = 1; attempt <= 4 && !g; attempt++) {
    await goTo(12, 100);
    await page.keyboard.press("End");
    const before = inlineResponses();
    await page.keyboard.press("Enter"); // typing a new line asks for ghost text
    g = await awaitSuggestion(before);
    if (!g) {
      log(`attempt ${attempt}: the server answered with no suggestion; typing the line again`);
      await restore();
    }
  }
  await shot("ghost-text");
  check(g, "no ghost text after typing a new line, 4 times");
  log(`ghost text: ${JSON.stringify(g)}`);
  // A suggestion that starts with more indentation than the cursor has: VS Code's first Tab indents
  // the line (its documented behaviour) and keeps the rest as ghost text; the next Tab accepts it.
  for (let tab = 1; tab <= 3 && (await ghostText()); tab++) {
    await page.keyboard.press("Tab");
    await until("the ghost text to go or move", 10_000, async () => (await ghostText()) !== g).catch(() => {});
    g = await ghostText();
  }
  check(!(await ghostText()), "three Tabs did not accept the ghost text");
  const doc = await readDocument();
  const inserted = replaced(doc, cut, cut, "ghost text");
  check(inserted.startsWith("\n") && !blank(inserted), `Tab did not put the suggestion in: ${JSON.stringify(inserted)}`);
  log(`accepted: ${JSON.stringify(inserted)}`);
};

CASES["explicit-trigger"] = async () => {
  await restore();
  let g;
  for (let attempt = 1; attempt <= 4 && !g; attempt++) {
    await goTo(21, 5); // the blank line `    |` in describe(): moving there asks for nothing
    await page.keyboard.press("Escape");
    const asked = inlineRequests().length;
    const before = inlineResponses();
    await page.keyboard.press("Alt+Backslash");
    g = await awaitSuggestion(before);
    // Invoked (1), not Automatic (2): the suggestion answers the key.
    await until("an invoked inlineCompletion request in the trace", 10_000,
      () => inlineRequests().slice(asked).some((e) => e.body?.context?.triggerKind === 1));
    if (!g) log(`attempt ${attempt}: the server answered with no suggestion; asking again`);
  }
  await shot("explicit-trigger");
  check(g, "Alt+\\ showed no suggestion, 4 times");
  log(`suggestion: ${JSON.stringify(g)}`);
  await page.keyboard.press("Escape");
  check((await readDocument()) === ORIGINAL, "a suggestion changed the document without Tab");
};

CASES["palette-rewrite"] = async () => {
  // The body of mean(), whole lines (4:0-8:0), rewritten with an instruction.
  await rewriteWithSeeds("palette rewrite", {
    want: appliedText, select: () => select(5, 1, 4), instruction: "use sum()",
    verify: async (r) => {
      await shot(`palette-rewrite-seed${r.seed}`);
      // The "rewriting…" progress toast closes a moment after the edit lands: not a warning.
      const progress = (t) => t.startsWith("dgemma: rewriting");
      await until("the rewriting progress to close", 10_000, async () => !(await toasts()).some(progress));
      const warnings = (await toasts()).filter((t) => t.startsWith("dgemma"));
      check(warnings.length === 0, `a warning after an applied rewrite: ${warnings.join(" / ")}`);
      const doc = await readDocument();
      const middle = replaced(doc, at(4, 0), at(8, 0), "palette rewrite");
      check(middle === r.result.text, `the document got ${JSON.stringify(middle)}, the server sent ${JSON.stringify(r.result.text)}`);
      // Whole lines were selected: the line after the selection keeps its own line.
      check(middle.endsWith("\n"), `the line after the selection was glued on: ${JSON.stringify(middle)}`);
      log(`rewritten (seed ${r.seed}): ${JSON.stringify(middle)}`);
    },
  });
};

CASES["code-action"] = async () => {
  await restore();
  await select(5, 1, 4);
  await palette("Refactor...");
  const item = page.locator(".action-widget .monaco-list-row", { hasText: "Rewrite selection" }).first();
  await item.waitFor({ state: "visible", timeout: 30_000 }).catch(() => {});
  await shot("code-action");
  check(await item.isVisible(), 'the code action "Rewrite selection…" was not offered on a selection');
  // Choosing it asks for the instruction (the extension's middleware); Escape cancels.
  await item.click();
  await page.locator(INPUT).waitFor({ state: "visible", timeout: 10_000 });
  await page.keyboard.press("Escape");
  check((await readDocument()) === ORIGINAL, "a cancelled code action changed the document");
};

CASES["empty-rewrite"] = async () => {
  // Bug 1: a whole line (13:0-14:0, `    total = sum(squares)` with its newline), regenerated
  // (no instruction); the bundled model often answers it with nothing at all, the more so with
  // a budget of one token (servers that regenerate through dgemma.maxTokensInvoked).
  await rewriteWithSeeds("empty rewrite", {
    want: (r) => emptyAnswer(r) || (r.result?.applied === true && blank(r.result.text)),
    select: () => select(14, 1, 1), instruction: "", settings: { "dgemma.maxTokensInvoked": 1 },
    verify: async (r) => {
      const messages = await until("a message for the user", 10_000, async () => {
        const t = await toasts();
        return t.some((m) => m.startsWith("dgemma")) && t;
      }).catch(() => []);
      await shot("empty-rewrite");
      log(`notifications: ${JSON.stringify(messages)}`);
      const doc = await readDocument();
      check(doc === ORIGINAL, `an empty answer changed the document (server said ${r.said}):\n${doc}`);
      // The extension refuses such an edit (defence in depth), but the server must not send it:
      // other editors apply what they get.
      check(!r.edits.some(blank), `the server asked VS Code to apply a blank replacement of a non-blank line `
        + `(the extension refused it; server said ${r.said})`);
      check(messages.some((m) => m.startsWith("dgemma") && /nothing|empty/i.test(m)),
        `the user was not told the model gave nothing (notifications: ${JSON.stringify(messages)})`);
    },
  });
};

CASES["indented-selection"] = async () => {
  // Bug 2: Home stops at the first non-blank, Shift+Down keeps the column: 12:4-14:4. Three
  // answers, since one may keep the selection's shape by chance.
  await rewriteWithSeeds("indented selection", {
    want: appliedText, select: () => select(13, 1, 2, { home: true }), instruction: "use better names", count: 3,
    verify: async (r) => {
      await shot(`indented-selection-seed${r.seed}`);
      const doc = await readDocument();
      const middle = replaced(doc, at(12, 4), at(14, 4), "indented selection");
      const docLines = lines(doc);
      const i = docLines.lastIndexOf("    count = len(values)");
      check(i >= 0 && docLines.slice(i).join("\n") === lines(ORIGINAL).slice(14).join("\n"),
        `the text after the selection left its line (seed ${r.seed}, server said ${r.said}):\n${doc}`);
      check(!/^\s{5,}/.test(docLines[12]) || /^\s/.test(ORIGINAL.slice(at(12, 4))),
        `the rewrite's first line is indented twice (seed ${r.seed}, server said ${r.said}): ${JSON.stringify(docLines[12])}`);
      log(`rewritten (seed ${r.seed}): ${JSON.stringify(middle)}`);
    },
  });
};

// ---- main --------------------------------------------------------------------------------------
if (process.argv.includes("--list")) {
  console.log(Object.keys(CASES).join("\n"));
  process.exit(0);
}
const wanted = (env.E2E_CASES ?? "").split(",").map((s) => s.trim()).filter(Boolean);
const unknown = wanted.filter((w) => !(w in CASES));
if (unknown.length) {
  console.error(`unknown case(s) ${unknown.join(", ")}; cases: ${Object.keys(CASES).join(", ")}`);
  process.exit(2);
}
// "ready" always runs first: every other case needs the server.
const selected = Object.keys(CASES).filter((c) => c === "ready" || wanted.length === 0 || wanted.includes(c));

const require = createRequire(path.join(env.E2E_PLAYWRIGHT, "package.json"));
const { chromium } = require(env.E2E_PLAYWRIGHT);
fs.mkdirSync(SHOTS, { recursive: true });
const browser = await chromium.launch({
  executablePath: env.E2E_CHROMIUM,
  headless: true,
  // As root in a container; no network beyond loopback here, so nothing in the background.
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"],
});
const results = [];
try {
  page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  page.setDefaultTimeout(30_000);
  await page.goto(env.E2E_URL);
  await page.locator(".monaco-workbench").waitFor({ timeout: 180_000 });
  log("VS Code is up");
  await openFile();
  for (const name of selected) {
    const t = Date.now();
    try {
      await CASES[name]();
      results.push([name, true]);
      log(`PASS ${name} (${((Date.now() - t) / 1000).toFixed(1)} s)`);
    } catch (err) {
      results.push([name, false]);
      await shot(`FAILED-${name}`);
      log(`FAIL ${name} (${((Date.now() - t) / 1000).toFixed(1)} s): ${err instanceof Failure ? err.message : err.stack}`);
      if (name === "ready") break;
      await page.keyboard.press("Escape").catch(() => {});
    }
  }
} catch (err) {
  results.push(["(driver)", false]);
  await shot("FAILED-driver");
  log(`the driver failed: ${err.stack}`);
} finally {
  await browser.close();
}
const passed = results.filter((r) => r[1]).length;
for (const [name, ok] of results) console.log(`  ${ok ? "ok  " : "FAIL"} ${name}`);
console.log(`e2e: ${passed} passed, ${results.length - passed} failed`);
process.exit(passed === results.length && results.length > 0 ? 0 : 1);

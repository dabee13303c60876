import { strict as assert } from "node:assert";
import * as fs from "node:fs";
import * as path from "node:path";
import { test } from "node:test";

import {
  deletesCode,
  guardWorkspaceEdit,
  LspRange,
  needsInstruction,
  NOTHING_WRITTEN,
  rewriteArguments,
  rewriteOutcome,
  serverCommand,
  serverOptions,
  serverProcess,
  statusView,
  withInstruction,
} from "../src/logic";

test("status bar follows the daemon state", () => {
  assert.match(statusView(undefined).text, /circle-slash/);
  assert.match(statusView({ state: "loading", message: "Loading the model" }).text, /sync~spin/);
  assert.match(statusView({ state: "ready", model: "tiny" }).tooltip, /tiny/);
  const err = statusView({ state: "error", message: "model missing" });
  assert.ok(err.error && err.tooltip.includes("model missing"));
  assert.match(statusView({ state: "ready", busy: true }).text, /sync~spin/);
});

test("only known, well-typed settings reach the server", () => {
  const opts = serverOptions({
    debounceMs: 50,
    maxTokensAutomatic: "many",
    sampler: { max_denoising_steps: 16 },
    serverCommand: ["x"],
    strength: -1,
  });
  assert.deepEqual(opts, { debounceMs: 50, sampler: { max_denoising_steps: 16 } });
  assert.deepEqual(serverOptions({ sampler: [1] }), {});
  assert.deepEqual(serverOptions({ seed: 7 }), { seed: 7 });
  assert.deepEqual(serverOptions({ seed: null }), {});
  assert.deepEqual(serverOptions({ seed: 1.5 }), {});
});

test("the server never runs in the workspace folder", () => {
  const p = serverProcess(["python3", "-m", "dgemma.lsp"], "/home/u/.vscode/globalStorage/dgemma.dgemma", {
    PATH: "/usr/bin",
  });
  assert.equal(p.command, "python3");
  assert.deepEqual(p.args, ["-m", "dgemma.lsp"]);
  assert.equal(p.options.cwd, "/home/u/.vscode/globalStorage/dgemma.dgemma");
  assert.equal(p.options.env.PATH, "/usr/bin");
  assert.equal(p.options.env.PYTHONSAFEPATH, "1");
});

test("server command from the setting", () => {
  assert.deepEqual(serverCommand(undefined), { command: "dgemma", args: ["lsp"] });
  assert.deepEqual(serverCommand(["/usr/bin/python3", "-m", "dgemma.lsp"]), {
    command: "/usr/bin/python3",
    args: ["-m", "dgemma.lsp"],
  });
  assert.deepEqual(serverCommand("  dgemma   lsp "), { command: "dgemma", args: ["lsp"] });
  assert.deepEqual(serverCommand([]), { command: "dgemma", args: ["lsp"] });
});

test("rewrite arguments and the instruction prompt", () => {
  const range = { start: { line: 1, character: 0 }, end: { line: 2, character: 0 } };
  assert.deepEqual(rewriteArguments("file:///a.py", range, "  add types "), ["file:///a.py", range, "add types"]);
  assert.ok(needsInstruction("dgemma.rewrite", ["file:///a.py", range]));
  assert.ok(!needsInstruction("dgemma.rewrite", ["file:///a.py", range, "x"]));
  assert.ok(!needsInstruction("dgemma.fill", ["file:///a.py", { line: 0, character: 0 }]));
  assert.ok(needsInstruction("dgemma.rewrite", [{ uri: "file:///a.py", range }]));
  assert.deepEqual(withInstruction(["u", range], "go"), ["u", range, "go"]);
  assert.deepEqual(withInstruction([{ uri: "u", range }], "go"), [{ uri: "u", range, instruction: "go" }]);
});

test("rewrite outcome messages", () => {
  assert.equal(rewriteOutcome({ applied: true, text: "x" }), undefined);
  assert.equal(rewriteOutcome({ applied: false, message: "model missing" }), "dgemma: model missing");
  assert.match(rewriteOutcome({ applied: false, text: "" }) ?? "", /nothing/);
  assert.match(rewriteOutcome(null) ?? "", /no answer/);
  // Refused because the model wrote nothing: say so, not "the document changed".
  assert.equal(rewriteOutcome({ applied: false, text: "\n" }), NOTHING_WRITTEN);
  assert.equal(rewriteOutcome({ applied: false, text: "  \n\t" }), NOTHING_WRITTEN);
  assert.match(rewriteOutcome({ applied: false, text: "x = 1\n" }) ?? "", /not applied/);
});

test("an empty or blank answer never replaces code", () => {
  assert.ok(deletesCode("def mean(values):\n", "\n"));
  assert.ok(deletesCode("x", ""));
  assert.ok(deletesCode("    return x\n    ", " \t\r\n"));
  assert.ok(!deletesCode("", ""), "an insertion of nothing deletes nothing");
  assert.ok(!deletesCode("\n\n", "\n"), "blank lines may become fewer blank lines");
  assert.ok(!deletesCode("def mean(values):\n", "def mean(xs):\n"));
});

test("workspace/applyEdit guard", () => {
  const doc = "\"\"\"Doc.\"\"\"\n\n\ndef mean(values):\n    return sum(values) / len(values)\n";
  const lines = doc.split("\n");
  const offset = (p: { line: number; character: number }) =>
    lines.slice(0, p.line).reduce((n, l) => n + l.length + 1, 0) + p.character;
  const textAt = (uri: string, r: LspRange) =>
    uri === "file:///a.py" ? doc.slice(offset(r.start), offset(r.end)) : undefined;
  const defLine = { start: { line: 3, character: 0 }, end: { line: 4, character: 0 } };
  // What the server answered in issue 21, versioned (documentChanges) and not (changes).
  const versioned = {
    documentChanges: [{ textDocument: { uri: "file:///a.py", version: 3 }, edits: [{ range: defLine, newText: "\n" }] }],
  };
  assert.equal(guardWorkspaceEdit(versioned, textAt), NOTHING_WRITTEN);
  assert.equal(guardWorkspaceEdit({ changes: { "file:///a.py": [{ range: defLine, newText: "" }] } }, textAt), NOTHING_WRITTEN);
  // A real rewrite, an insertion (fill) and a document that is not open pass.
  assert.equal(
    guardWorkspaceEdit({ changes: { "file:///a.py": [{ range: defLine, newText: "def mean(xs):\n" }] } }, textAt),
    undefined,
  );
  const here = { start: { line: 4, character: 4 }, end: { line: 4, character: 4 } };
  assert.equal(guardWorkspaceEdit({ changes: { "file:///a.py": [{ range: here, newText: "  " }] } }, textAt), undefined);
  assert.equal(guardWorkspaceEdit({ changes: { "file:///b.py": [{ range: defLine, newText: "" }] } }, textAt), undefined);
  // Resource operations (create/rename/delete) are not text edits.
  assert.equal(guardWorkspaceEdit({ documentChanges: [{ kind: "create", uri: "file:///c.py" }] }, textAt), undefined);
  assert.equal(guardWorkspaceEdit(undefined, textAt), undefined);
});

test("the manifest declares what the extension reads and ships a bundle", () => {
  const root = path.join(__dirname, "..", "..");
  const manifest = JSON.parse(fs.readFileSync(path.join(root, "package.json"), "utf8"));
  const props = manifest.contributes.configuration.properties as Record<string, unknown>;
  // vscode-languageclient reads `<id>.trace.server` for the client id "dgemma".
  for (const key of ["dgemma.serverCommand", "dgemma.trace.server", "dgemma.seed"]) assert.ok(key in props, key);
  const source = fs.readFileSync(path.join(root, "src", "logic.ts"), "utf8");
  const known = source.slice(source.indexOf("SERVER_SETTINGS"), source.indexOf("] as const"));
  for (const m of known.matchAll(/"(\w+)"/g)) assert.ok(`dgemma.${m[1]}` in props, `dgemma.${m[1]} is not declared`);
  // One bundled file, not node_modules (vsce warned about 231 files).
  assert.equal(manifest.main, "./dist/extension.js");
  assert.ok(fs.existsSync(path.join(root, "dist", "extension.js")), "npm run bundle writes dist/extension.js");
  const ignore = fs.readFileSync(path.join(root, ".vscodeignore"), "utf8").split("\n");
  assert.ok(ignore.includes("node_modules/**") && ignore.includes("out/**"));
  assert.match(manifest.scripts.package, /--no-dependencies/);
  // VS Code has no default key for an explicit inline suggestion any more: Alt+\ is ours.
  assert.ok(
    manifest.contributes.keybindings.some(
      (k: { command: string; key: string }) => k.command === "editor.action.inlineSuggest.trigger" && k.key === "alt+\\",
    ),
  );
});

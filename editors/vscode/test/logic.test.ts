import { strict as assert } from "node:assert";
import { test } from "node:test";

import {
  needsInstruction,
  rewriteArguments,
  rewriteOutcome,
  serverCommand,
  serverOptions,
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
});

// Pure logic of the extension: no `vscode` import, so `npm test` runs it in plain node.

/** The daemon's state as the server reports it in `dgemma/status` notifications. */
export interface DaemonStatus {
  state: string; // stopped | starting | loading | ready | error
  message?: string;
  model?: string | null;
  busy?: boolean;
}

export interface StatusView {
  text: string;
  tooltip: string;
  error: boolean;
}

/** What the status bar shows for a daemon state (codicons in `$(...)`). */
export function statusView(status: DaemonStatus | undefined): StatusView {
  if (!status) {
    return { text: "$(circle-slash) dgemma", tooltip: "dgemma: language server not running", error: false };
  }
  const detail = status.message ? `: ${status.message}` : "";
  if (status.busy) {
    return { text: "$(sync~spin) dgemma", tooltip: `dgemma is working${detail}`, error: false };
  }
  switch (status.state) {
    case "ready":
      return { text: "$(sparkle) dgemma", tooltip: `dgemma ready${status.model ? ` (${status.model})` : ""}`, error: false };
    case "starting":
    case "loading":
      return { text: "$(sync~spin) dgemma", tooltip: `dgemma ${status.state}${detail}`, error: false };
    case "error":
      return { text: "$(error) dgemma", tooltip: `dgemma failed${detail}`, error: true };
    default:
      return { text: `$(question) dgemma`, tooltip: `dgemma ${status.state}${detail}`, error: false };
  }
}

/** Settings keys the server understands (camelCase, as in package.json). */
export const SERVER_SETTINGS = [
  "debounceMs",
  "maxLineSuffix",
  "maxTokensAutomatic",
  "maxTokensInvoked",
  "maxLinesAutomatic",
  "prefixTokens",
  "suffixTokens",
  "extraTokens",
  "strength",
  "sampler",
  "seed",
] as const;

/**
 * initializationOptions for the server from the `dgemma.*` settings: only the
 * keys it knows, and only values of a sane type (a typo in settings.json must
 * not reach the server as garbage).
 */
export function serverOptions(settings: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const key of SERVER_SETTINGS) {
    const value = settings[key];
    if (value === undefined || value === null) continue;
    if (key === "sampler") {
      if (typeof value === "object" && !Array.isArray(value)) out[key] = value;
    } else if (key === "seed") {
      if (typeof value === "number" && Number.isSafeInteger(value) && value >= 0) out[key] = value;
    } else if (typeof value === "number" && Number.isFinite(value) && value >= 0) {
      out[key] = value;
    }
  }
  return out;
}

/** The executable and arguments that start `dgemma lsp`. */
export function serverCommand(setting: unknown): { command: string; args: string[] } {
  if (Array.isArray(setting) && setting.length > 0 && setting.every((s) => typeof s === "string" && s !== "")) {
    return { command: setting[0], args: setting.slice(1) };
  }
  if (typeof setting === "string" && setting.trim() !== "") {
    // A single string: split on blanks (no quoting; use the array form for paths with spaces).
    const parts = setting.trim().split(/\s+/);
    return { command: parts[0], args: parts.slice(1) };
  }
  return { command: "dgemma", args: ["lsp"] };
}

/**
 * How to start `dgemma lsp`: never in the workspace folder. `python -m dgemma.lsp` puts its
 * working directory first on sys.path, so a workspace with a top-level `kernels/` or `dgemma/`
 * folder would shadow installed packages. `cwd` is a folder of the extension's own (its global
 * storage) or the user's home; PYTHONSAFEPATH=1 keeps Python 3.11+ from adding it at all.
 */
export function serverProcess(
  setting: unknown,
  cwd: string,
  env: Record<string, string | undefined>,
): { command: string; args: string[]; options: { cwd: string; env: Record<string, string | undefined> } } {
  const cmd = serverCommand(setting);
  return { ...cmd, options: { cwd, env: { ...env, PYTHONSAFEPATH: "1" } } };
}

export interface LspPosition {
  line: number;
  character: number;
}

export interface LspRange {
  start: LspPosition;
  end: LspPosition;
}

/** Arguments of the server's `dgemma.rewrite` command. */
export function rewriteArguments(uri: string, range: LspRange, instruction: string): [string, LspRange, string] {
  return [uri, range, instruction.trim()];
}

/**
 * The server's code action calls `dgemma.rewrite(uri, range)` without an
 * instruction (a generic client cannot prompt). True when the extension should
 * ask the user for one before passing the command on.
 */
export function needsInstruction(command: string, args: unknown[]): boolean {
  if (command !== "dgemma.rewrite") return false;
  if (args.length === 1 && typeof args[0] === "object" && args[0] !== null) {
    return typeof (args[0] as Record<string, unknown>).instruction !== "string";
  }
  return args.length < 3;
}

/** The command's arguments with the user's instruction added. */
export function withInstruction(args: unknown[], instruction: string): unknown[] {
  if (args.length === 1 && typeof args[0] === "object" && args[0] !== null) {
    return [{ ...(args[0] as Record<string, unknown>), instruction }];
  }
  return [args[0], args[1], instruction];
}

export const NOTHING_WRITTEN = "dgemma: the model gave nothing (an empty answer); the code was left as it was";

/** The server's answer to dgemma.rewrite / dgemma.fill, as a message for the user (undefined: success). */
export function rewriteOutcome(result: unknown): string | undefined {
  if (!result || typeof result !== "object") return "dgemma: no answer from the language server";
  const r = result as { applied?: boolean; message?: string; text?: string };
  if (r.applied) return undefined;
  if (r.message) return r.message.startsWith("dgemma") ? r.message : `dgemma: ${r.message}`;
  // Empty or whitespace only: the model wrote nothing (refused by the server or by
  // guardWorkspaceEdit below, or nothing to insert for a fill).
  if (typeof r.text === "string" && r.text.trim() === "") return NOTHING_WRITTEN;
  return "dgemma: the edit was not applied (the document changed meanwhile?)";
}

/**
 * True when applying `replacement` over `original` would only delete code: the new text is
 * empty or whitespace while the replaced text was not. A rewrite must never do that (issue 21:
 * an empty answer for a selected `def` line deleted the line).
 */
export function deletesCode(original: string, replacement: string): boolean {
  return replacement.trim() === "" && original.trim() !== "";
}

/** The parts of an LSP WorkspaceEdit the guard reads. */
export interface TextEditLike {
  range: LspRange;
  newText: string;
}
export interface WorkspaceEditLike {
  changes?: Record<string, TextEditLike[]>;
  documentChanges?: unknown[];
}

/**
 * Checks an edit the server asks the editor to apply (`workspace/applyEdit`): undefined when it
 * may be applied, else why not. `textAt(uri, range)` is the document's current text in `range`
 * (undefined when the document is not open: such an edit is left to the editor).
 */
export function guardWorkspaceEdit(
  edit: WorkspaceEditLike | undefined,
  textAt: (uri: string, range: LspRange) => string | undefined,
): string | undefined {
  const edits: Array<[string, TextEditLike]> = [];
  for (const [uri, list] of Object.entries(edit?.changes ?? {})) {
    for (const e of list ?? []) edits.push([uri, e]);
  }
  for (const change of edit?.documentChanges ?? []) {
    const c = change as { textDocument?: { uri?: unknown }; edits?: unknown };
    if (!c || typeof c.textDocument?.uri !== "string" || !Array.isArray(c.edits)) continue; // create/rename/delete
    for (const e of c.edits as TextEditLike[]) edits.push([c.textDocument.uri, e]);
  }
  for (const [uri, e] of edits) {
    if (!e || typeof e.newText !== "string" || !e.range) continue;
    const original = textAt(uri, e.range);
    if (original !== undefined && deletesCode(original, e.newText)) return NOTHING_WRITTEN;
  }
  return undefined;
}

// VS Code side of dgemma: starts `dgemma lsp`, lets vscode-languageclient register
// inline completion (ghost text), and adds the rewrite command and a status bar item.
import * as os from "node:os";
import * as vscode from "vscode";
import {
  CancellationToken,
  ExecuteCommandRequest,
  LanguageClient,
  LanguageClientOptions,
  ServerOptions,
  State,
} from "vscode-languageclient/node";

import {
  DaemonStatus,
  guardWorkspaceEdit,
  LspRange,
  needsInstruction,
  rewriteArguments,
  rewriteOutcome,
  serverOptions,
  serverProcess,
  statusView,
  withInstruction,
} from "./logic";

let client: LanguageClient | undefined;
let statusItem: vscode.StatusBarItem;
let lastStatus: DaemonStatus | undefined;
let serverCwd: string = os.homedir();

function settings(): Record<string, unknown> {
  const cfg = vscode.workspace.getConfiguration("dgemma");
  const out: Record<string, unknown> = {};
  for (const key of Object.keys(cfg)) {
    if (typeof (cfg as unknown as Record<string, unknown>)[key] !== "function") out[key] = cfg.get(key);
  }
  return out;
}

function showStatus(status: DaemonStatus | undefined): void {
  lastStatus = status;
  const view = statusView(status);
  statusItem.text = view.text;
  statusItem.tooltip = view.tooltip;
  statusItem.accessibilityInformation = { label: view.tooltip };
  statusItem.backgroundColor = view.error ? new vscode.ThemeColor("statusBarItem.errorBackground") : undefined;
  statusItem.show();
}

async function askInstruction(): Promise<string | undefined> {
  return vscode.window.showInputBox({
    title: "dgemma: Rewrite selection",
    prompt: "Instruction (leave empty to regenerate the selection)",
    placeHolder: "e.g. add type hints",
  });
}

/** The open document's text in an LSP range (undefined when the document is not open). */
function textAt(c: LanguageClient, uri: string, range: LspRange): string | undefined {
  const wanted = c.protocol2CodeConverter.asUri(uri).toString();
  const doc = vscode.workspace.textDocuments.find((d) => d.uri.toString() === wanted);
  return doc?.getText(c.protocol2CodeConverter.asRange(range));
}

async function startClient(): Promise<void> {
  // Never the workspace folder (see serverProcess).
  const server: ServerOptions = serverProcess(
    vscode.workspace.getConfiguration("dgemma").get("serverCommand"),
    serverCwd,
    process.env,
  );
  const options: LanguageClientOptions = {
    documentSelector: [{ scheme: "file" }, { scheme: "untitled" }],
    initializationOptions: serverOptions(settings()),
    synchronize: { configurationSection: "dgemma" },
    middleware: {
      // The server's "Rewrite selection…" code action carries no instruction:
      // ask for one here, where there is a UI to ask with.
      executeCommand: async (command, args, next) => {
        if (needsInstruction(command, args)) {
          const instruction = await askInstruction();
          if (instruction === undefined) return undefined;
          args = withInstruction(args, instruction);
        }
        const result = await next(command, args);
        const problem = command.startsWith("dgemma.") && command !== "dgemma.status" ? rewriteOutcome(result) : undefined;
        if (problem) void vscode.window.showWarningMessage(problem);
        return result;
      },
      workspace: {
        // Defence in depth: whatever the server sends, an empty or whitespace-only
        // replacement never overwrites code. The command's result then tells the user.
        handleApplyEdit: async (params, next) => {
          const refused = guardWorkspaceEdit(params.edit, (uri, range) => textAt(c, uri, range));
          if (refused) return { applied: false, failureReason: refused };
          return next(params, CancellationToken.None);
        },
      },
    },
  };
  const c = new LanguageClient("dgemma", "dgemma", server, options);
  // Registered before start(): the server reports "starting" and "loading" while
  // the daemon comes up, before start() resolves. The handlers belong to this
  // client and are dropped with it on restart, so they never pile up.
  c.onNotification("dgemma/status", (s: DaemonStatus) => showStatus(s));
  c.onDidChangeState((e) => {
    if (e.newState === State.Stopped) showStatus(undefined);
  });
  client = c;
  await c.start();
}

async function stopClient(): Promise<void> {
  const c = client;
  client = undefined;
  await c?.dispose();
}

async function rewriteSelection(): Promise<void> {
  const editor = vscode.window.activeTextEditor;
  if (!editor || !client) return;
  const sel = editor.selection;
  if (sel.isEmpty) {
    void vscode.window.showInformationMessage("dgemma: select the code to rewrite first");
    return;
  }
  const instruction = await askInstruction();
  if (instruction === undefined) return;
  const range = client.code2ProtocolConverter.asRange(sel);
  const args = rewriteArguments(editor.document.uri.toString(), range, instruction);
  const result = await vscode.window.withProgress(
    { location: vscode.ProgressLocation.Notification, title: "dgemma: rewriting…", cancellable: true },
    (_progress, token) =>
      client!.sendRequest(ExecuteCommandRequest.type, { command: "dgemma.rewrite", arguments: args }, token),
  );
  const problem = rewriteOutcome(result);
  if (problem) void vscode.window.showWarningMessage(problem);
}

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  statusItem = vscode.window.createStatusBarItem("dgemma.status", vscode.StatusBarAlignment.Right, 100);
  statusItem.name = "dgemma";
  statusItem.command = "dgemma.showStatus";
  context.subscriptions.push(statusItem);
  showStatus({ state: "starting", message: "Starting the language server" });
  // The server's working directory: a folder of the extension's own, created here.
  try {
    await vscode.workspace.fs.createDirectory(context.globalStorageUri);
    if (context.globalStorageUri.scheme === "file") serverCwd = context.globalStorageUri.fsPath;
  } catch {
    serverCwd = os.homedir();
  }

  context.subscriptions.push(
    vscode.commands.registerCommand("dgemma.rewriteSelection", rewriteSelection),
    vscode.commands.registerCommand("dgemma.showStatus", () => {
      const view = statusView(lastStatus);
      void vscode.window.showInformationMessage(view.tooltip);
    }),
    vscode.commands.registerCommand("dgemma.restartServer", async () => {
      // A new client rather than client.restart(): it picks up a changed dgemma.serverCommand.
      await stopClient();
      await startClient();
    }),
  );
  try {
    await startClient();
  } catch (err) {
    showStatus({ state: "error", message: String(err) });
    void vscode.window.showErrorMessage(
      `dgemma: cannot start the language server (${String(err)}). Is \`dgemma\` on PATH? See the dgemma.serverCommand setting.`,
    );
  }
}

export async function deactivate(): Promise<void> {
  await stopClient();
}

-- dgemma for Neovim: ghost-text completions and rewrites from `dgemma lsp`.
--
-- Neovim 0.12+ draws ghost text while typing itself (vim.lsp.inline_completion);
-- on 0.11 this module requests textDocument/inlineCompletion and draws
-- extmarks. Explicit requests (`trigger`) always take this module's path: the
-- native API can accept a candidate but not ask for one. The server debounces,
-- caches and cancels; this side only cancels its own stale request and keeps
-- the display in step with the cursor.
local M = {}

local api = vim.api
local ns = api.nvim_create_namespace('dgemma')
local METHOD = 'textDocument/inlineCompletion'

M.config = {
  -- How to start the language server.
  cmd = { 'dgemma', 'lsp' },
  -- nil = every normal buffer; or a list such as { 'python', 'lua' }.
  filetypes = nil,
  root_markers = { '.git', 'pyproject.toml', 'package.json', 'Cargo.toml', 'go.mod' },
  -- Ask for ghost text while typing (otherwise only on `trigger`).
  auto_trigger = true,
  -- Client-side pause before a request; the server debounces too.
  debounce_ms = 30,
  -- Use vim.lsp.inline_completion when the running Neovim has it (0.12+).
  native = true,
  -- Passed to the server as initializationOptions (see docs: debounceMs, seed, ...).
  settings = {},
  keymaps = {
    accept = '<Tab>',
    accept_word = '<M-w>',
    accept_line = '<M-l>',
    dismiss = '<C-]>',
    trigger = '<M-\\>',
    -- Normal mode: ask for the next edit (or, with one shown, jump to it), and accept it.
    next_edit = '<M-n>',
    accept_next_edit = '<M-y>',
  },
}

-- Last `dgemma/status` notification: { state, message, model, busy }.
M.status = nil
-- Result of the last :DgemmaRewrite, for scripts and tests.
M.last_rewrite = nil

---@type table<integer, {text: string, row: integer, col: integer, extmark: integer}>
local suggestions = {}
---@type table<integer, {client: vim.lsp.Client, id: integer}>
local pending = {}
local timers = {}
-- changedtick right after this module inserted an accepted part: the
-- TextChangedI that follows is ours, not the user's typing.
local accepted_tick = {}

-- vim.lsp.inline_completion exists from Neovim 0.12 on.
local function use_native()
  return M.config.native and vim.lsp.inline_completion ~= nil
end

-- Drop the candidate Neovim shows, if any; true when there was one. The native
-- API has no dismiss: "accepting" with a handler that inserts nothing drops it.
local function native_dismiss(bufnr)
  return use_native() and vim.lsp.inline_completion.get({ bufnr = bufnr, on_accept = function() end }) or false
end

local function get_client(bufnr)
  return vim.lsp.get_clients({ bufnr = bufnr or 0, name = 'dgemma' })[1]
end

-- ---- display (all ghost text on 0.11, invoked suggestions on 0.12) -----------------

local function clear(bufnr)
  bufnr = bufnr == 0 and api.nvim_get_current_buf() or bufnr
  local s = suggestions[bufnr]
  if s and api.nvim_buf_is_valid(bufnr) then
    pcall(api.nvim_buf_del_extmark, bufnr, ns, s.extmark)
  end
  suggestions[bufnr] = nil
end

local function cancel(bufnr)
  local p = pending[bufnr]
  if p then
    -- Sends $/cancelRequest: the server cancels the daemon request with it.
    pcall(function() p.client:cancel_request(p.id) end)
    pending[bufnr] = nil
  end
end

local function show(bufnr, row, col, text)
  clear(bufnr)
  local lines = vim.split(text, '\n', { plain = true })
  local virt_lines = {}
  for i = 2, #lines do
    virt_lines[#virt_lines + 1] = { { lines[i], 'DgemmaSuggestion' } }
  end
  local opts = {
    virt_text = { { lines[1], 'DgemmaSuggestion' } },
    virt_text_pos = 'inline',
    hl_mode = 'combine',
  }
  if #virt_lines > 0 then
    opts.virt_lines = virt_lines
  end
  local ok, id = pcall(api.nvim_buf_set_extmark, bufnr, ns, row, col, opts)
  if ok then
    suggestions[bufnr] = { text = text, row = row, col = col, extmark = id }
  end
end

--- The ghost text this module shows in a buffer (not Neovim's native
--- candidate), or nil.
---@return {text: string, row: integer, col: integer}|nil
function M.suggestion(bufnr)
  bufnr = (bufnr == nil or bufnr == 0) and api.nvim_get_current_buf() or bufnr
  local s = suggestions[bufnr]
  return s and { text = s.text, row = s.row, col = s.col } or nil
end

--- Whether this module shows ghost text in the buffer.
function M.visible(bufnr)
  return M.suggestion(bufnr) ~= nil
end

-- ---- requests ---------------------------------------------------------------------

-- The text of an LSP item (insertText) or of a 0.12 native one (insert_text);
-- a snippet (a StringValue table) gives its raw value.
local function item_text(item)
  local t = item.insert_text or item.insertText
  if type(t) == 'table' then
    t = t.value
  end
  return t
end

--- Ask the server for ghost text at the cursor, drawn by this module (also on
--- 0.12, where a native candidate on screen is dropped for it).
---@param kind? integer 1 invoked (default), 2 automatic
function M.trigger(kind)
  kind = kind or 1
  local bufnr = api.nvim_get_current_buf()
  local client = get_client(bufnr)
  if not client then
    return
  end
  native_dismiss(bufnr)
  cancel(bufnr)
  local win = api.nvim_get_current_win()
  local cursor = api.nvim_win_get_cursor(win)
  local tick = api.nvim_buf_get_changedtick(bufnr)
  local params = vim.lsp.util.make_position_params(win, client.offset_encoding)
  params.context = { triggerKind = kind }
  local ok, id = client:request(METHOD, params, function(err, result)
    if pending[bufnr] and pending[bufnr].id == id then
      pending[bufnr] = nil
    end
    if err or not result then
      return
    end
    -- Stale: the user typed or moved on since the request went out.
    if not api.nvim_buf_is_valid(bufnr) or api.nvim_buf_get_changedtick(bufnr) ~= tick then
      return
    end
    local now = api.nvim_win_is_valid(win) and api.nvim_win_get_cursor(win) or nil
    if not now or now[1] ~= cursor[1] or now[2] ~= cursor[2] then
      return
    end
    local items = result.items or result
    local item = items and items[1]
    local text = item and item_text(item)
    if not text or text == '' then
      return
    end
    local row, col = cursor[1] - 1, cursor[2]
    if item.range then
      local line = api.nvim_buf_get_lines(bufnr, item.range.start.line, item.range.start.line + 1, false)[1] or ''
      row = item.range.start.line
      col = vim.str_byteindex(line, client.offset_encoding, item.range.start.character, false)
    end
    show(bufnr, row, col, text)
  end, bufnr)
  if ok and id then
    pending[bufnr] = { client = client, id = id }
  end
end

local function schedule_trigger(bufnr)
  if timers[bufnr] then
    timers[bufnr]:stop()
  else
    timers[bufnr] = vim.uv.new_timer()
  end
  timers[bufnr]:start(M.config.debounce_ms, 0, vim.schedule_wrap(function()
    if api.nvim_get_current_buf() == bufnr and vim.fn.mode():sub(1, 1) == 'i' then
      M.trigger(2)
    end
  end))
end

-- ---- accepting ----------------------------------------------------------------------

-- Insert `text` at (row, col), 0-based, and put the cursor after it; returns
-- where the text ends.
local function put_text(bufnr, row, col, text)
  local lines = vim.split(text, '\n', { plain = true })
  api.nvim_buf_set_text(bufnr, row, col, row, col, lines)
  local end_row = row + #lines - 1
  local end_col = (#lines == 1 and col or 0) + #lines[#lines]
  local win = vim.fn.bufwinid(bufnr)
  if win ~= -1 then
    api.nvim_win_set_cursor(win, { end_row + 1, end_col })
  end
  return end_row, end_col
end

-- Insert `part` of this module's suggestion and keep the rest on screen.
local function insert_part(bufnr, part)
  local s = suggestions[bufnr]
  if not s or part == '' then
    return
  end
  local rest = s.text:sub(#part + 1)
  clear(bufnr)
  local end_row, end_col = put_text(bufnr, s.row, s.col, part)
  accepted_tick[bufnr] = api.nvim_buf_get_changedtick(bufnr)
  if rest ~= '' then
    show(bufnr, end_row, end_col, rest)
  end
end

-- Where a native item's range starts, 0-based (row, byte column): 0.12's
-- vim.Range holds vim.Pos fields `start` and `end_`, later versions give the
-- positions through :to_extmark().
local function range_start(range)
  if type(range) ~= 'table' then
    return nil
  end
  if type(range.start) == 'table' and range.start.row then
    return range.start.row, range.start.col
  end
  if range.to_extmark then
    return range:to_extmark()
  end
end

-- The part of a native item not in the buffer yet: its range starts where the
-- request was made, and Neovim keeps showing the item while the user types
-- through it.
local function native_rest(bufnr, item)
  local text = item_text(item) or ''
  local row, col = range_start(item.range)
  local cursor = api.nvim_win_get_cursor(0)
  if row == cursor[1] - 1 and col <= cursor[2] then
    local typed = api.nvim_buf_get_lines(bufnr, row, row + 1, false)[1]:sub(col + 1, cursor[2])
    if vim.startswith(text, typed) then
      text = text:sub(#typed + 1)
    end
  end
  return text
end

-- Accept `pick(text)` of the suggestion on screen, or all of it without `pick`.
-- Returns false when there is none. The text goes in on the next tick, as with
-- vim.lsp.inline_completion.get(), so this can run inside an <expr> mapping,
-- where buffer edits are not allowed.
local function accept_part(pick)
  local bufnr = api.nvim_get_current_buf()
  if use_native() and vim.lsp.inline_completion.get({
    bufnr = bufnr,
    -- Neovim applies a whole item itself. A part we insert, and returning
    -- nothing tells Neovim not to apply the item as well.
    on_accept = pick and function(item)
      local row, col = unpack(api.nvim_win_get_cursor(0))
      put_text(bufnr, row - 1, col, pick(native_rest(bufnr, item)))
    end,
  }) then
    return true
  end
  local s = suggestions[bufnr]
  if not s then
    return false
  end
  vim.schedule(function()
    if suggestions[bufnr] == s then
      insert_part(bufnr, pick and pick(s.text) or s.text)
    end
  end)
  return true
end

--- Accept the whole suggestion. Returns false when there was none (see accept_part).
function M.accept()
  return accept_part()
end

--- The next word of a suggestion (leading blanks included).
function M._next_word(text)
  return text:match('^%s*[%w_]+') or text:match('^%s*[^%w_%s]+') or text:match('^%s+') or text
end

--- The next line of a suggestion: up to its newline, or through the next line
--- when the suggestion starts with one.
function M._next_line(text)
  if text:sub(1, 1) == '\n' then
    local nl = text:find('\n', 2, true)
    return nl and text:sub(1, nl - 1) or text
  end
  local nl = text:find('\n', 1, true)
  return nl and text:sub(1, nl - 1) or text
end

function M.accept_word()
  return accept_part(M._next_word)
end

function M.accept_line()
  return accept_part(M._next_line)
end

--- Drop the suggestion on screen and any request under way. Returns false when
--- nothing was shown.
function M.dismiss()
  local bufnr = api.nvim_get_current_buf()
  cancel(bufnr)
  local shown = native_dismiss(bufnr) or suggestions[bufnr] ~= nil
  clear(bufnr)
  return shown
end

-- ---- rewrite ------------------------------------------------------------------------

local function utf_col(line, byte_col, encoding)
  byte_col = math.min(byte_col, #line)
  return vim.str_utfindex(line, encoding, byte_col, false)
end

--- Rewrite lines `line1..line2` (1-based, inclusive) with an instruction; with a
--- charwise visual selection on those lines, only the selected text.
---@param opts {line1: integer, line2: integer, args?: string, charwise?: boolean}
function M.rewrite(opts)
  local bufnr = api.nvim_get_current_buf()
  local client = get_client(bufnr)
  if not client then
    vim.notify('dgemma: the language server is not attached to this buffer', vim.log.levels.WARN)
    return
  end
  local enc = client.offset_encoding
  local lines = api.nvim_buf_get_lines(bufnr, 0, -1, false)
  local l1, l2 = opts.line1, opts.line2
  local range
  if opts.charwise then
    local s, e = vim.fn.getpos("'<"), vim.fn.getpos("'>")
    local sl, el = lines[s[2]] or '', lines[e[2]] or ''
    -- '> is the column of the last selected byte, past the end of the line
    -- after `v$` or on an empty line: clamp it, then take all the bytes of
    -- that last character.
    local c = math.min(e[3], #el)
    local last = c > 0 and (c + vim.str_utf_end(el, c)) or 0
    range = {
      start = { line = s[2] - 1, character = utf_col(sl, s[3] - 1, enc) },
      ['end'] = { line = e[2] - 1, character = utf_col(el, last, enc) },
    }
  elseif l2 < #lines then
    range = { start = { line = l1 - 1, character = 0 }, ['end'] = { line = l2, character = 0 } }
  else
    range = {
      start = { line = l1 - 1, character = 0 },
      ['end'] = { line = l2 - 1, character = utf_col(lines[l2] or '', #(lines[l2] or ''), enc) },
    }
  end

  local function run(instruction)
    if instruction == nil then
      return -- prompt cancelled
    end
    M.last_rewrite = nil
    local params = {
      command = 'dgemma.rewrite',
      arguments = { vim.uri_from_bufnr(bufnr), range, instruction },
    }
    vim.notify('dgemma: rewriting…', vim.log.levels.INFO)
    client:request('workspace/executeCommand', params, function(err, result)
      M.last_rewrite = result or { applied = false, message = err and err.message or 'no result' }
      if err then
        vim.notify('dgemma: ' .. (err.message or 'rewrite failed'), vim.log.levels.ERROR)
      elseif result and not result.applied then
        vim.notify('dgemma: ' .. (result.message or 'nothing to apply'), vim.log.levels.WARN)
      end
      api.nvim_exec_autocmds('User', { pattern = 'DgemmaRewriteDone', modeline = false })
    end, bufnr)
  end

  if opts.args and opts.args ~= '' then
    run(opts.args)
  else
    vim.ui.input({ prompt = 'Rewrite instruction (empty: regenerate): ' }, run)
  end
end

-- ---- next-edit suggestions (dgemma/nextEdit) -----------------------------------

local ns_next = api.nvim_create_namespace('dgemma_next')
---@type table<integer, {edits: table[], version: integer}>
local next_edits = {}

local function clear_next(bufnr)
  bufnr = bufnr == 0 and api.nvim_get_current_buf() or bufnr
  if api.nvim_buf_is_valid(bufnr) then
    api.nvim_buf_clear_namespace(bufnr, ns_next, 0, -1)
  end
  next_edits[bufnr] = nil
end

--- Show `edits` (LSP TextEdits of whole lines, as the server sends them) for document
--- `version`: the replaced lines highlighted, the new ones as virtual lines below them.
function M._show_next(bufnr, edits, version)
  bufnr = bufnr == 0 and api.nvim_get_current_buf() or bufnr
  clear_next(bufnr)
  if #edits == 0 or version ~= api.nvim_buf_get_changedtick(bufnr) then
    return -- nothing to show, or for another text than the buffer's
  end
  local count = api.nvim_buf_line_count(bufnr)
  for _, e in ipairs(edits) do
    local first, last = e.range.start.line, e.range['end'].line
    for row = first, math.min(last, count) - 1 do
      api.nvim_buf_set_extmark(bufnr, ns_next, row, 0, { line_hl_group = 'DgemmaNextEditOld' })
    end
    local virt = {}
    for _, line in ipairs(vim.split((e.newText:gsub('\n$', '')), '\n', { plain = true })) do
      virt[#virt + 1] = { { line ~= '' and line or ' ', 'DgemmaNextEdit' } }
    end
    if e.newText ~= '' then
      local below = last > first and last <= count
      local row = below and last - 1 or math.min(first, count - 1)
      api.nvim_buf_set_extmark(bufnr, ns_next, math.max(row, 0), 0,
        { virt_lines = virt, virt_lines_above = not below and first < count })
    end
  end
  next_edits[bufnr] = { edits = edits, version = version }
end

--- The next edit this module shows in a buffer ({edits, version}), or nil.
function M.next_suggestion(bufnr)
  return next_edits[(bufnr == nil or bufnr == 0) and api.nvim_get_current_buf() or bufnr]
end

--- Ask the server for the edit that follows the recent ones, near the cursor; with one
--- shown already, jump to it instead.
function M.next_edit()
  local bufnr = api.nvim_get_current_buf()
  local shown = next_edits[bufnr]
  if shown then
    api.nvim_win_set_cursor(0, { shown.edits[1].range.start.line + 1, 0 })
    return
  end
  local client = get_client(bufnr)
  if not client then
    return
  end
  local params = { textDocument = { uri = vim.uri_from_bufnr(bufnr) },
                   position = { line = api.nvim_win_get_cursor(0)[1] - 1, character = 0 } }
  client:request('dgemma/nextEdit', params, function(err, result)
    if err or not result then
      return
    end
    M._show_next(bufnr, result.edits or {}, result.version)
    api.nvim_exec_autocmds('User', { pattern = 'DgemmaNextEditDone', modeline = false })
  end, bufnr)
end

--- Apply the next edit shown in the buffer, as one undo step; false when none is shown.
function M.accept_next_edit()
  local bufnr = api.nvim_get_current_buf()
  local shown = next_edits[bufnr]
  clear_next(bufnr)
  if not shown or shown.version ~= api.nvim_buf_get_changedtick(bufnr) then
    return false
  end
  local client = get_client(bufnr)
  vim.lsp.util.apply_text_edits(shown.edits, bufnr, client and client.offset_encoding or 'utf-16')
  return true
end

-- ---- attaching --------------------------------------------------------------------

function M.statusline()
  local s = M.status
  if not s then
    return ''
  end
  if s.busy then
    return 'dgemma …'
  end
  local icons = { ready = 'dgemma', starting = 'dgemma ⟳', loading = 'dgemma ⟳', error = 'dgemma ✗' }
  return icons[s.state] or ('dgemma ' .. tostring(s.state))
end

local function capabilities()
  local caps = vim.lsp.protocol.make_client_capabilities()
  -- Tell the server we show ghost text ourselves on 0.11 too, so it does not
  -- also answer textDocument/completion with the same text.
  caps.textDocument.inlineCompletion = caps.textDocument.inlineCompletion or { dynamicRegistration = false }
  return caps
end

local function wanted(bufnr)
  if vim.bo[bufnr].buftype ~= '' or not vim.bo[bufnr].modifiable then
    return false
  end
  local fts = M.config.filetypes
  if not fts then
    return vim.bo[bufnr].filetype ~= ''
  end
  return vim.tbl_contains(fts, vim.bo[bufnr].filetype)
end

function M.attach(bufnr)
  bufnr = (bufnr == nil or bufnr == 0) and api.nvim_get_current_buf() or bufnr
  if not wanted(bufnr) then
    return
  end
  local root = vim.fs.root(bufnr, M.config.root_markers) or vim.fn.getcwd()
  vim.lsp.start({
    name = 'dgemma',
    cmd = M.config.cmd,
    -- Not the project folder: a server started as `python -m ...` there would find the
    -- project's own folders first on its import path (a top-level `kernels/` breaks transformers).
    cmd_cwd = vim.uv.os_tmpdir(),
    root_dir = root,
    init_options = M.config.settings,
    settings = { dgemma = M.config.settings },
    capabilities = capabilities(),
    handlers = {
      ['dgemma/status'] = function(_, result)
        M.status = result
        pcall(api.nvim_exec_autocmds, 'User', { pattern = 'DgemmaStatus', modeline = false })
      end,
    },
  }, { bufnr = bufnr })
end

local function on_lsp_attach(args)
  local client = vim.lsp.get_client_by_id(args.data.client_id)
  if not client or client.name ~= 'dgemma' then
    return
  end
  if use_native() and M.config.auto_trigger then
    vim.lsp.inline_completion.enable(true, { bufnr = args.buf })
  end
end

local function map_keys()
  local km = M.config.keymaps or {}
  -- The key does its own work (a Tab is a Tab) unless a suggestion is on screen;
  -- `fn` only schedules its edits, as an <expr> mapping requires.
  local function expr_map(lhs, fn, desc)
    if lhs then
      vim.keymap.set('i', lhs, function()
        return fn() and '' or vim.keycode(lhs)
      end, { expr = true, replace_keycodes = false, desc = desc })
    end
  end
  expr_map(km.accept, M.accept, 'dgemma: accept suggestion')
  expr_map(km.accept_word, M.accept_word, 'dgemma: accept next word')
  expr_map(km.accept_line, M.accept_line, 'dgemma: accept next line')
  expr_map(km.dismiss, M.dismiss, 'dgemma: dismiss suggestion')
  if km.trigger then
    vim.keymap.set('i', km.trigger, function() M.trigger(1) end, { desc = 'dgemma: suggest here' })
  end
  if km.next_edit then
    vim.keymap.set('n', km.next_edit, M.next_edit, { desc = 'dgemma: next edit (ask, or jump to it)' })
  end
  if km.accept_next_edit then
    vim.keymap.set('n', km.accept_next_edit, M.accept_next_edit, { desc = 'dgemma: accept the next edit' })
  end
end

function M.setup(opts)
  M.config = vim.tbl_deep_extend('force', M.config, opts or {})
  api.nvim_set_hl(0, 'DgemmaSuggestion', { link = 'Comment', default = true })
  api.nvim_set_hl(0, 'DgemmaNextEdit', { link = 'DiffAdd', default = true })
  api.nvim_set_hl(0, 'DgemmaNextEditOld', { link = 'DiffDelete', default = true })
  local group = api.nvim_create_augroup('dgemma', { clear = true })
  api.nvim_create_autocmd({ 'FileType', 'BufEnter' }, {
    group = group,
    callback = function(args) M.attach(args.buf) end,
  })
  api.nvim_create_autocmd('LspAttach', { group = group, callback = on_lsp_attach })
  -- This module's own suggestions (all of them on 0.11, invoked ones on 0.12)
  -- follow the cursor and the typing.
  api.nvim_create_autocmd('TextChangedI', {
    group = group,
    callback = function(args)
      if accepted_tick[args.buf] == api.nvim_buf_get_changedtick(args.buf) then
        return
      end
      clear(args.buf)
      -- On 0.12 Neovim asks for ghost text while typing itself.
      if M.config.auto_trigger and not use_native() and get_client(args.buf) then
        schedule_trigger(args.buf)
      end
    end,
  })
  api.nvim_create_autocmd('CursorMovedI', {
    group = group,
    callback = function(args)
      local s = suggestions[args.buf]
      if s then
        local c = api.nvim_win_get_cursor(0)
        if c[1] - 1 ~= s.row or c[2] ~= s.col then
          clear(args.buf)
        end
      end
    end,
  })
  -- A next edit is for the text it was asked about: typing, or leaving the buffer, drops it.
  api.nvim_create_autocmd({ 'TextChanged', 'TextChangedI', 'InsertEnter', 'BufLeave' }, {
    group = group,
    callback = function(args) clear_next(args.buf) end,
  })
  api.nvim_create_autocmd({ 'InsertLeave', 'BufLeave' }, {
    group = group,
    callback = function(args)
      cancel(args.buf)
      clear(args.buf)
    end,
  })
  map_keys()
  -- Buffers opened before setup (lazy loading) get the server too.
  for _, b in ipairs(api.nvim_list_bufs()) do
    if api.nvim_buf_is_loaded(b) then
      M.attach(b)
    end
  end
end

return M

-- dgemma: commands available before (and without) setup(); setup() starts the server.
if vim.g.loaded_dgemma then
  return
end
vim.g.loaded_dgemma = true

if vim.fn.has('nvim-0.11') == 0 then
  vim.api.nvim_echo({ { 'dgemma needs Neovim 0.11 or newer', 'WarningMsg' } }, true, {})
  return
end

-- :DgemmaRewrite [instruction] on a range or visual selection; without an
-- instruction it prompts (an empty answer regenerates the selection).
vim.api.nvim_create_user_command('DgemmaRewrite', function(opts)
  local mode = vim.fn.visualmode()
  local s, e = vim.fn.getpos("'<"), vim.fn.getpos("'>")
  -- Charwise only when the command was run on the current visual selection.
  local charwise = opts.range == 2 and mode == 'v' and s[2] == opts.line1 and e[2] == opts.line2
  require('dgemma').rewrite({ line1 = opts.line1, line2 = opts.line2, args = opts.args, charwise = charwise })
end, { range = true, nargs = '*', desc = 'dgemma: rewrite the selection with an instruction' })

vim.api.nvim_create_user_command('DgemmaTrigger', function()
  require('dgemma').trigger(1)
end, { desc = 'dgemma: suggest at the cursor' })

vim.api.nvim_create_user_command('DgemmaStatus', function()
  local s = require('dgemma').status
  print(s and string.format('dgemma: %s %s', s.state, s.message or '') or 'dgemma: not started')
end, { desc = 'dgemma: daemon state' })

vim.api.nvim_create_user_command('DgemmaNextEdit', function()
  require('dgemma').next_edit()
end, { desc = 'dgemma: the next edit after your recent ones (again: jump to it)' })

vim.api.nvim_create_user_command('DgemmaAcceptNextEdit', function()
  require('dgemma').accept_next_edit()
end, { desc = 'dgemma: apply the next edit shown' })

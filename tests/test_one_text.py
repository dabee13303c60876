"""The same request gives the same text in the shell and in an editor: the daemon cleans every
answer (engine/answers.py), so `dgemma fill` prints what the language server shows as ghost text."""
from __future__ import annotations

import json


from test_daemon_util import daemon, dgemma  # noqa: F401  (fixture)
from test_lsp_e2e import FAST_OPTIONS, inline_params, lsp_env, open_doc, running_client  # noqa: F401  (fixture)

# A tab-indented document with a closer after the cursor: the cleaning rules have work to do.
DOC = "def total(values):\n\tresult = 0\n\tfor v in values:\n\t\t\n\treturn result\n"


async def test_cli_fill_prints_the_ghost_text_of_the_same_spot(lsp_env, daemon, tmp_path):  # noqa: F811
    f = tmp_path / "total.py"
    f.write_text(DOC)
    uri = f.as_uri()
    steps, tokens, seed = FAST_OPTIONS["sampler"]["max_denoising_steps"], FAST_OPTIONS["maxTokensInvoked"], 0
    for seed in range(4):  # a seed whose answer is not empty, so there is text to compare
        r = dgemma(["fill", f"{f}:4:3", "--json", "--steps", str(steps), "--max-tokens", str(tokens),
                    "--seed", str(seed)], daemon.env)
        assert r.returncode == 0, r.stderr
        shell = json.loads(r.stdout)["middle"]
        if shell:
            break
    assert shell, "four seeds gave no text"
    async with running_client(lsp_env, {"seed": seed}) as client:
        open_doc(client, DOC, uri)
        res = await client.text_document_inline_completion_async(inline_params(3, 2, uri=uri))
    editor = res.items[0].insert_text if res else ""
    assert editor == shell

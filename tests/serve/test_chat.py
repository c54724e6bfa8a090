"""Chat templates render as transformers renders them (its renderer is the reference)."""

from __future__ import annotations

import json

import pytest

from moetrt.serve.chat import ChatTemplate

render_jinja_template = pytest.importorskip("transformers.utils.chat_template_utils").render_jinja_template

# a ChatML (Qwen-style) template using what real templates use: loop controls, tojson, special tokens
TEMPLATE = (
    "{%- for message in messages %}{%- if loop.index0 > 5 %}{% break %}{% endif %}"
    "{%- if message.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + message.role) }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content | tojson + '<|im_end|>' + '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}{{ bos_token }}"
)


@pytest.mark.parametrize("where", ["tokenizer_config.json", "chat_template.jinja"])
def test_renders_like_transformers(tmp_path, where):
    config = {"bos_token": {"content": "<s>"}, "eos_token": "</s>"}
    if where == "tokenizer_config.json":
        config["chat_template"] = TEMPLATE
    else:
        (tmp_path / where).write_text(TEMPLATE)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo <b>"},
                {"role": "assistant", "content": "x"}] * 3  # past the loop's break
    ours = ChatTemplate.from_folder(tmp_path).render(messages)
    theirs = render_jinja_template(conversations=[messages], chat_template=TEMPLATE, add_generation_prompt=True,
                                   bos_token="<s>", eos_token="</s>")[0][0]
    assert ours == theirs


def test_no_template_and_refused_messages(tmp_path):
    from moetrt.errors import MoetrtError

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert ChatTemplate.from_folder(tmp_path) is None
    assert ChatTemplate.from_folder(None) is None
    (tmp_path / "chat_template.jinja").write_text(TEMPLATE)
    with pytest.raises(MoetrtError, match="unknown role tool"):
        ChatTemplate.from_folder(tmp_path).render([{"role": "tool", "content": "x"}])

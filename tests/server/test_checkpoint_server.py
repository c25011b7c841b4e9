"""A server on a checkpoint directory whose tokenizer_config.json has a Jinja chat template, under
another served name and without an API key: chats use the template, outputs equal offline ones."""

from __future__ import annotations

import json
import shutil

import openai
from modelutil import tiny_model

from fast_xlstm import LLM, SamplingParams
from fast_xlstm.loading import tiny_tokenizer_dir

TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_checkpoint_with_chat_template(tmp_path, start_server):
    ckpt = tmp_path / "ckpt"
    tiny_model(seed=5).save_pretrained(ckpt)
    shutil.copy(tiny_tokenizer_dir() / "tokenizer.json", ckpt / "tokenizer.json")
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    srv = start_server("--model", str(ckpt), "--served-model-name", "tiny-chat", "tiny-alias", slots=4)
    offline = LLM(ckpt, device="cpu")
    prompt = offline.tokenizer.encode("<|system|>Be kind.\n<|user|>Hi\n<|assistant|>")
    [exp] = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
    with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0) as client:
        assert [m.id for m in client.models.list().data] == ["tiny-chat", "tiny-alias"]
        r = client.chat.completions.create(model="tiny-alias", max_tokens=10, temperature=0, messages=[
            {"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}])
        assert r.model == "tiny-alias"
        assert r.choices[0].message.content == exp.text and r.usage.prompt_tokens == len(prompt)

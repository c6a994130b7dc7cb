"""Prompt files: the four formats, inline overrides, stable ids, and errors that name the line."""

from __future__ import annotations

import pytest

from mixdiff_cli.sampling.prompts import PromptFileError, load_prompts, parse_prompts, parse_txt_line


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_txt_prompts_comments_and_overrides(tmp_path):
    path = write(
        tmp_path,
        "p.txt",
        "# a comment\n"
        "\n"
        "a red fox in the snow\n"
        "a cat's face, oil painting --n blurry, dark --seed 7 --steps 20 --w 64 --h 128\n"
        "  a blue bird --expert blues:0.7 --expert reds --cfg 5 --scheduler euler-a\n"
        "a tree --negative=ugly --seed=3\n",
    )
    items = load_prompts(path)
    assert [i.prompt for i in items] == ["a red fox in the snow", "a cat's face, oil painting", "a blue bird", "a tree"]
    assert [i.line for i in items] == [3, 4, 5, 6]
    assert [i.index for i in items] == [0, 1, 2, 3]
    fox, cat, bird, tree = items
    assert fox.negative is None and fox.seed is None and fox.experts == ()
    assert (cat.negative, cat.seed, cat.steps, cat.width, cat.height) == ("blurry, dark", 7, 20, 64, 128)
    assert bird.experts == (("blues", 0.7), ("reds", 1.0))
    assert (bird.guidance, bird.scheduler) == (5.0, "euler-a")
    assert (tree.negative, tree.seed) == ("ugly", 3)


def test_jsonl_csv_yaml_agree(tmp_path):
    jsonl = write(
        tmp_path,
        "p.jsonl",
        '{"prompt": "a red fox", "seed": 1, "negative_prompt": "dark"}\n'
        "\n"
        '"a bare string prompt"\n'
        '{"prompt": "a bird", "experts": {"blues": 2, "reds": 1}, "width": 64, "id": "bird-1"}\n',
    )
    csv = write(
        tmp_path,
        "p.csv",
        "prompt,seed,negative,experts,width,id\n"
        "a red fox,1,dark,,,\n"
        '"a bare string prompt",,,,,\n'
        '"a bird","","","blues:2, reds:1",64,bird-1\n',
    )
    yaml = write(
        tmp_path,
        "p.yaml",
        "prompts:\n"
        "  - {prompt: a red fox, seed: 1, n: dark}\n"
        "  - a bare string prompt\n"
        "  - prompt: a bird\n"
        "    experts: [blues:2, reds:1]\n"
        "    width: 64\n"
        "    id: bird-1\n",
    )
    parsed = [load_prompts(p) for p in (jsonl, csv, yaml)]
    as_dicts = [[{k: v for k, v in i.to_dict().items() if k != "line"} for i in items] for items in parsed]
    assert as_dicts[0] == as_dicts[1] == as_dicts[2]
    fox, bare, bird = parsed[0]
    assert (fox.prompt, fox.seed, fox.negative) == ("a red fox", 1, "dark")
    assert bare.prompt == "a bare string prompt" and bare.seed is None
    assert bird.experts == (("blues", 2.0), ("reds", 1.0)) and bird.id == "bird-1"
    assert [i.line for i in parsed[2]] == [2, 3, 4]  # yaml items keep their lines


def test_ids_are_stable_and_content_derived(tmp_path):
    a = load_prompts(write(tmp_path, "a.txt", "a red fox\na blue bird --seed 3\n"))
    b = load_prompts(write(tmp_path, "b.txt", "# new comment lines do not shift ids\na red fox\n\na blue bird --seed 3\n"))
    c = load_prompts(write(tmp_path, "c.txt", "a red fox\na blue bird --seed 4\n"))
    assert [i.id for i in a] == [i.id for i in b]
    assert a[0].id == c[0].id and a[1].id != c[1].id  # content changed -> new id
    assert a[0].id.startswith("00000-") and a[1].id.startswith("00001-")


@pytest.mark.parametrize(
    ("name", "text", "line", "needle"),
    [
        ("p.txt", "ok\nok too\na fox --seed abc\n", 3, "seed must be an integer"),
        ("p.txt", "ok\na fox --size 64\n", 2, "unknown option --size"),
        ("p.txt", "--seed 4\n", 1, "no prompt"),
        ("p.txt", "a fox --seed 4 5\n", 1, "takes one value"),
        ("p.txt", "a fox --w 60\n", 1, "multiple of 8"),
        ("p.txt", "a fox --steps 0\n", 1, "steps must be"),
        ("p.txt", "a fox --expert reds:-1\n", 1, "weight"),
        ("p.txt", "a fox --seed 1 --seed 2\n", 1, "given twice"),
        ("p.txt", "a fox --scheduler plms\n", 1, "unknown scheduler"),
        ("p.jsonl", '{"prompt": "ok"}\n{"prompt": "a", "sede": 1}\n', 2, "unknown key 'sede'"),
        ("p.jsonl", '{"prompt": "ok"}\n\n{"prompt": "a",\n', 3, "not valid JSON"),
        ("p.jsonl", "[1, 2]\n", 1, "expected a prompt or an object"),
        ("p.csv", "prompt,seed\nok,1\n\"multi\nline\",2\nbad,x\n", 5, "seed must be an integer"),
        ("p.csv", "text,seed\nok,1\n", 1, "no 'prompt' column"),
        ("p.yaml", "- ok\n- {prompt: a, seed: -1}\n", 2, "seed must be between"),
        ("p.yaml", "- ok\n- [a, b\n", 3, "YAML syntax error"),
        ("p.jsonl", '{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n', 2, "already used on line 1"),
    ],
)
def test_malformed_items_name_their_line(tmp_path, name, text, line, needle):
    path = write(tmp_path, name, text)
    with pytest.raises(PromptFileError) as info:
        load_prompts(path)
    assert f"{path}:{line}:" in info.value.message
    assert needle in info.value.message
    assert info.value.line == line
    assert info.value.hint and "--keep-going" not in info.value.hint  # offered by run_batch, which has the option (test_papercuts)


def test_keep_going_collects_every_bad_item_and_keeps_indices(tmp_path):
    path = write(tmp_path, "p.txt", "a\nb --seed x\nc\nd --w 7\ne\n")
    parsed = parse_prompts(path)
    assert [i.prompt for i in parsed.items] == ["a", "c", "e"]
    assert [i.index for i in parsed.items] == [0, 2, 4]  # fixing line 2 later does not shift c and e
    assert [e.line for e in parsed.errors] == [2, 4]


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [("p.doc", "a", "unsupported prompt file type"), ("p.txt", "# only comments\n\n", "holds no prompts")],
)
def test_unusable_files(tmp_path, name, content, needle):
    with pytest.raises(PromptFileError, match=needle):
        parse_prompts(write(tmp_path, name, content))


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(PromptFileError, match="does not exist"):
        parse_prompts(tmp_path / "nope.txt")
    bad = tmp_path / "bin.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(PromptFileError, match="not UTF-8"):
        parse_prompts(bad)


def test_txt_line_grammar():
    assert parse_txt_line("a -- b --seed 3") == {"prompt": "a -- b ", "seed": "3"}  # '--' alone is text
    assert parse_txt_line('x --n "quoted, negative"') == {"prompt": "x ", "negative": "quoted, negative"}
    assert parse_txt_line("x --expert a,b: 0.5 --expert c d") == {"prompt": "x ", "experts": ["a", "b: 0.5", "c", "d"]}
    assert parse_txt_line("well-known --w 64")["prompt"] == "well-known "


def test_bom_is_ignored(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffa fox\n".encode("utf-8"))
    assert load_prompts(path)[0].prompt == "a fox"

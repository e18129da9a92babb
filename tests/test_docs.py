"""The README and docs/ agree with the code: the README's Python API list
(names, parameters, defaults), build_info()'s keys, the C++ example and test
program in docs/ops.md, the modules' own constructor docstrings; every local
link of the README and docs/ leads to a file that exists."""

import ast
import inspect
import pathlib
import re

import pytest
import torch

import masknorm
import masknorm.functional

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
OPS_DOC = ROOT / "docs" / "ops.md"
needs_readme = pytest.mark.skipif(not README.is_file(), reason="needs the clone's README")


def readme_section(title, path=README):
    text = path.read_text()
    start = text.index(f"\n{title}\n")
    end = re.search(r"\n#{2,3} ", text[start + len(title) + 2:])
    return text[start: start + len(title) + 2 + (end.start() if end else len(text))]


def documented_signatures():
    """{'masknorm.X': params text, 'masknorm.X.forward': params text} from the
    README's Python API list (a `forward(...)` belongs to the class before it)."""
    found, last_class = {}, None
    for code in re.findall(r"`([^`]+)`", readme_section("### Python API")):
        m = re.fullmatch(r"(masknorm(?:\.\w+)+|forward)\((.*)\)", code)
        if not m:
            continue
        name, params = m.groups()
        if name == "forward":
            assert last_class, f"forward(...) before any class: {code}"
            name = f"{last_class}.forward"
        elif inspect.isclass(eval(name, {"masknorm": masknorm})):
            last_class = name
        assert name not in found, f"{name} listed twice"
        found[name] = params
    return found


def parse_params(params):
    """[(name, kind, default)] of a README parameter list."""
    args = ast.parse(f"def f({params}): pass").body[0].args
    result = []
    positional = args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    for arg, default in zip(positional, defaults):
        result.append((arg.arg, "positional", inspect.Parameter.empty if default is None
                       else ast.literal_eval(default)))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        result.append((arg.arg, "keyword", inspect.Parameter.empty if default is None
                       else ast.literal_eval(default)))
    return result


def actual_params(obj):
    sig = inspect.signature(obj)
    kinds = {inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional", inspect.Parameter.KEYWORD_ONLY: "keyword"}
    return [(p.name, kinds[p.kind], p.default) for p in sig.parameters.values() if p.name != "self"]


def public_callables():
    names = {f"masknorm.{n}" for n in masknorm.__all__ if n != "functional"}
    names |= {f"masknorm.functional.{n}" for n in masknorm.functional.__all__}
    names |= {f"masknorm.{n}.forward" for n in masknorm.__all__ if inspect.isclass(getattr(masknorm, n))}
    return names


def resolve(name):
    obj = masknorm
    for part in name.split(".")[1:]:
        obj = getattr(obj, part)
    return obj.__init__ if inspect.isclass(obj) else obj


@needs_readme
def test_readme_api_list_names_every_public_callable():
    assert set(documented_signatures()) == public_callables()


@needs_readme
@pytest.mark.parametrize("name", sorted(public_callables()))
def test_readme_api_list_has_the_real_signature(name):
    documented = documented_signatures()
    assert name in documented, f"{name} is not in the README's Python API list"
    assert parse_params(documented[name]) == actual_params(resolve(name)), name


def build_info_keys_in(text):
    return set(re.findall(r"`(\w+)`", text))


@needs_readme
def test_build_info_keys_are_documented_in_the_readme_and_docstring():
    keys = set(masknorm.build_info())
    bullet = re.search(r"- `masknorm\.build_info\(\)`(.*?)\n(?=- |\n)", readme_section("### Python API"), re.S)
    assert bullet, "no build_info() entry in the README's Python API list"
    documented = build_info_keys_in(bullet.group(1)) & (keys | {"version"})
    assert documented == keys, f"README: documented {sorted(documented)}, returned {sorted(keys)}"
    doc_keys = set(re.findall(r"- ``(\w+)``:", masknorm.build_info.__doc__))
    assert doc_keys == keys, f"docstring: {sorted(doc_keys)}, returned {sorted(keys)}"


def fenced_blocks(text, lang):
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


@needs_readme
@pytest.mark.parametrize("lang,path", [("cpp", "examples/cpp/main.cpp"), ("cmake", "examples/cpp/CMakeLists.txt")])
def test_readme_cpp_example_is_the_built_example(lang, path):
    """docs/ops.md shows examples/cpp as it is; CI (.ci/run) builds and runs it."""
    blocks = fenced_blocks(readme_section("## C++ (LibTorch)", OPS_DOC), lang)
    assert (ROOT / path).read_text() in blocks


def test_cpp_example_has_main():
    assert re.search(r"^int main\(\)", (ROOT / "examples/cpp/main.cpp").read_text(), re.M)


@needs_readme
def test_readme_names_the_built_cpp_test_program():
    cmake = (ROOT / "CMakeLists.txt").read_text()
    target = re.search(r"add_executable\((\w+) tests/cpp/test_ops\.cpp\)", cmake).group(1)
    assert f"`build-cpp/{target}`" in readme_section("## C++ (LibTorch)", OPS_DOC)


def local_links(path):
    """(target, resolved path) of each Markdown link or image in ``path`` that
    is not a URL or an anchor."""
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if not re.match(r"[a-z]+:|#", target):
            yield target, (path.parent / target.split("#")[0]).resolve()


@needs_readme
def test_readme_and_docs_links_lead_to_files():
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    links = [(page.relative_to(ROOT), target, resolved) for page in pages for target, resolved in local_links(page)]
    assert any(str(page) == "README.md" and target.startswith("docs/") for page, target, _ in links)
    assert [(str(page), target) for page, target, resolved in links if not resolved.exists()] == []


@needs_readme
def test_readme_stays_short():
    """What a newcomer needs first; detail belongs in docs/."""
    assert len(README.read_text().splitlines()) <= 260


@pytest.mark.parametrize("cls,base", [(masknorm.MaskedBatchNorm1d, "nn.BatchNorm1d"),
                                      (masknorm.MaskedBatchNorm2d, "nn.BatchNorm2d"),
                                      (masknorm.MaskedBatchNorm3d, "nn.BatchNorm3d"),
                                      (masknorm.MaskedGroupNorm, "nn.GroupNorm"),
                                      (masknorm.MaskedInstanceNorm1d, "nn.InstanceNorm1d"),
                                      (masknorm.MaskedInstanceNorm2d, "nn.InstanceNorm2d"),
                                      (masknorm.MaskedInstanceNorm3d, "nn.InstanceNorm3d"),
                                      (masknorm.MaskedLayerNorm, "nn.LayerNorm"),
                                      (masknorm.MaskedRMSNorm, "nn.RMSNorm")])
def test_module_constructors_have_their_own_docstrings(cls, base):
    assert "__init__" in vars(cls)
    doc = inspect.getdoc(cls.__init__)
    assert doc and doc.startswith(f"Same arguments as {base}"), doc
    for name in actual_params(cls.__init__):
        assert f"``{name[0]}``" in doc, f"{cls.__name__}.__init__ docstring does not mention {name[0]}"


def test_transformer_layout_without_channels_last_says_how_to_fix_it():
    bn = masknorm.MaskedBatchNorm1d(8)
    x = torch.randn(4, 5, 8)  # (N, L, C)
    with pytest.raises(RuntimeError, match=r"pass channels_last=True: MaskedBatchNorm1d\(8, channels_last=True\)"):
        bn(x)
    with pytest.raises(RuntimeError, match="channels_last=True"):
        bn(x, torch.zeros(4, 5, dtype=torch.bool))
    # the right layouts still run
    assert masknorm.MaskedBatchNorm1d(8, channels_last=True)(x).shape == x.shape
    assert bn(x.transpose(1, 2)).shape == (4, 8, 5)

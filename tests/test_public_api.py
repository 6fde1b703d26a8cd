"""The public losses API and the README's generated tables stay true to the registries."""

import inspect
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import kdforge.losses
from kdforge import docs_tables
from kdforge.cli import app
from kdforge.losses import LOSS_MODULES, LOSSES
from kdforge.provenance import Paper, bibtex_entries, unique_papers

README = Path(__file__).resolve().parents[1] / "README.md"
runner = CliRunner()


def own(registry, attr):
    """kdforge's own entries of a registry (a plugin a test registered is not exported)."""
    return [(name, spec) for name, spec in registry.items() if getattr(spec, attr).__module__.startswith("kdforge.")]


def test_every_registered_loss_and_loss_module_is_importable_under_its_name():
    losses, modules = own(LOSSES, "fn"), own(LOSS_MODULES, "cls")
    assert losses and modules
    for name, spec in losses:
        assert getattr(kdforge.losses, name) is spec.fn, name
        assert name in kdforge.losses.__all__, name
    for name, spec in modules:
        assert getattr(kdforge.losses, name) is spec.cls, name
        assert name in kdforge.losses.__all__, name
    assert len(set(kdforge.losses.__all__)) == len(kdforge.losses.__all__)
    assert all(hasattr(kdforge.losses, name) for name in kdforge.losses.__all__)


def test_the_names_the_issue_asked_for_import_and_their_modules_still_do():
    from kdforge.losses import dac_kl, generalized_jsd, margin_mse, mi_alpha, taid
    from kdforge.losses.dac_kl import DACKL
    from kdforge.losses.mutual_information import MIAlpha
    from kdforge.losses.ranking import margin_mse_scores
    from kdforge.losses.taid import TAIDSchedule, taid_kernel

    assert generalized_jsd is LOSSES.get("generalized_jsd").fn
    assert taid is LOSSES.get("taid").fn and callable(TAIDSchedule) and callable(taid_kernel)
    assert margin_mse is margin_mse_scores
    assert dac_kl is DACKL and mi_alpha is MIAlpha


def _readme_row(kind: str, name: str) -> list[str]:
    match = re.search(r"^\| " + kind + r" \| `" + re.escape(name) + r"` \|(.*)\|$", README.read_text(), flags=re.M)
    assert match, f"README.md has no row for {kind} {name}; run {docs_tables.REGENERATE}"
    return [c.strip() for c in re.split(r"(?<!\\)\|", match.group(1))]


def _bare(fn, *, drop_self=False) -> str:
    params = list(inspect.signature(fn).parameters.values())[1 if drop_self else 0 :]
    return str(inspect.Signature([p.replace(annotation=inspect.Parameter.empty) for p in params]))


def test_the_readme_documents_each_loss_with_the_signature_it_is_imported_with():
    for name, spec in own(LOSSES, "fn"):
        compares, call, summary, paper = _readme_row("loss", name)[:4]
        assert call == f"`{name}{_bare(getattr(kdforge.losses, name))}`", name
        assert compares.startswith(spec.target if spec.target != "none" else "nothing")
        assert paper == (spec.paper.markdown() if spec.paper else "—")
    for name, _spec in own(LOSS_MODULES, "cls"):
        cls = getattr(kdforge.losses, name)
        call = _readme_row("loss module", name)[1]
        assert (
            call == f"`{name}{_bare(cls.__init__, drop_self=True)}`, then `module{_bare(cls.forward, drop_self=True)}`"
        )


def test_the_readme_tables_are_generated_from_the_registries():
    text = README.read_text()
    assert docs_tables.current_tables(text) is not None, "README.md lost its table markers"
    assert docs_tables.replace_tables(text) == text, (
        f"README.md's tables of losses and methods are out of date; run: {docs_tables.REGENERATE}"
    )
    for name, cls in docs_tables.registered_methods():
        assert f"| `{name}` |" in text
        if cls.paper is not None:
            assert cls.paper.markdown() in text


def test_the_regenerating_command_checks_and_rewrites_a_readme(tmp_path, capsys):
    stale = tmp_path / "README.md"
    stale.write_text(f"# x\n\nbefore\n\n{docs_tables.START}\nold table\n{docs_tables.END}\n\nafter\n")
    assert docs_tables.main(["--check", str(stale)]) == 1
    assert docs_tables.REGENERATE in capsys.readouterr().err
    assert docs_tables.main(["--write", str(stale)]) == 0
    text = stale.read_text()
    assert docs_tables.main(["--check", str(stale)]) == 0
    assert text.startswith("# x\n\nbefore\n\n") and text.endswith("\n\nafter\n") and "old table" not in text
    assert "| loss | `hinton_kd` |" in text
    unmarked = tmp_path / "plain.md"
    unmarked.write_text("no markers\n")
    assert docs_tables.main(["--check", str(unmarked)]) == 2


def test_losses_from_a_paper_say_which_and_arxiv_ids_are_well_formed():
    expected = {
        "hinton_kd": "1503.02531",
        "generalized_jsd": "2306.13649",
        "margin_mse": "2010.02666",
        "attention_kl": "2002.10957",
        "qkv_relations": "2012.15828",
        "dkd": "2203.08679",
        "taid": "2501.16937",
        "sinkhorn": "2402.17110",
        "dac_kl": "2407.10068",
        "mi_alpha": "2109.11105",
        "listnet": "2204.00185",
    }
    specs = dict([*own(LOSSES, "fn"), *own(LOSS_MODULES, "cls")])
    for name, arxiv in expected.items():
        assert specs[name].paper is not None and specs[name].paper.arxiv == arxiv, name
    assert specs["cross_entropy"].paper is None
    for spec in specs.values():
        if spec.paper is not None:
            assert spec.paper.arxiv is None or re.fullmatch(r"\d{4}\.\d{4,5}", spec.paper.arxiv)
            assert spec.paper.link and 1990 < spec.paper.year < 2100


def test_tasks_cite_a_paper_only_when_they_are_its_method():
    from kdforge.tasks import TASKS

    papers = {name: cls.paper for name, cls in TASKS.items()}
    assert papers["vq_index"].arxiv == "2204.00185" and papers["sparse_retriever"].arxiv == "2411.04403"
    assert papers["classification"] is None and papers["causal_lm"] is None


def test_papers_deduplicate_by_identity_and_bibtex_keys_never_collide():
    a = Paper("Distilling the Knowledge in a Neural Network", 2015, "1503.02531")
    same = Paper("Distilling the knowledge in a neural network", 2015, "1503.02531", authors="Hinton and others")
    twin_key = Paper("Distilling Things", 2015, url="https://example.org/p")
    assert unique_papers([a, None, same, twin_key]) == [a, twin_key]
    entries = bibtex_entries([a, twin_key])
    assert "@misc{distilling2015," in entries and "@misc{distilling2015b," in entries
    assert "url = {https://example.org/p}" in entries


def test_kdforge_list_methods_shows_each_method_with_its_paper_and_needs():
    result = runner.invoke(app, ["list", "--methods"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    methods = docs_tables.registered_methods()
    if not methods:
        assert "none registered" in result.stdout
    for name, cls in methods:
        assert name in result.stdout
        if cls.paper is not None and cls.paper.arxiv:
            assert cls.paper.arxiv in result.stdout
        if cls.needs_teacher:
            assert "a teacher" in result.stdout
    assert "teacher signals:" not in result.stdout and "bundled recipes" not in result.stdout


def test_kdforge_list_losses_shows_papers_and_nothing_else():
    result = runner.invoke(app, ["list", "--losses"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "hinton_kd" in result.stdout and "1503.02531" in result.stdout and "dac_kl" in result.stdout
    assert "bundled recipes" not in result.stdout


@pytest.mark.parametrize("args", [["list"], ["list", "--methods", "--losses"]])
def test_kdforge_list_with_no_or_both_options_lists_losses_and_methods(args):
    result = runner.invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "hinton_kd" in result.stdout
    for name, _cls in docs_tables.registered_methods():
        assert name in result.stdout

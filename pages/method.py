"""Method: the formulation of docs/METHOD.md, and one module's solve on a real layer, step by step."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from pages import _ui as ui
from pages._progress import job_progress
from structprune import plots
from structprune.demo import demo_entries
from structprune.planning import available_models, stepthrough_stages
from structprune.stepthrough import MAX_STEPS, admm_stepthrough, stepthrough_key, support_rows

st.title("The method")
st.caption("The project's own formulation (the paper's formulas are not public in full): per-module "
           "least-squares subproblems on Gram matrices, ADMM for the structured support, an exact refit, and an "
           "energy softmax across layers.")

st.markdown("**Units and budget.** A unit is a query head (its q rows and o columns) or an MLP channel (a row of "
            "gate/up and a column of down). The target $s$ is the share of prunable parameters removed; "
            "$N_m$ is module $m$'s prunable parameters.")
st.latex(r"B = s \sum_m N_m")
st.markdown("**One module's subproblem.** For the output projection $W$ (bias $b$) with inputs $P$ over $T$ tokens, "
            "keep only the Gram matrix of the augmented input $\\tilde P = [P; 1]$:")
st.latex(r"G = \tfrac{1}{T}\,\tilde P \tilde P^\top,\qquad \tilde W = [W,\ b],\qquad "
         r"f(W') = \tfrac{1}{T}\lVert \tilde W \tilde P - W' \tilde P \rVert^2 = "
         r"\operatorname{tr}\big((\tilde W - W')\, G\, (\tilde W - W')^\top\big)")
st.markdown("Constraint: the columns of $W'$ outside the kept set $S$ are zero, $|S| = k$ (the bias column is always "
            "kept). Damping $\\lambda = 0.01\\,\\overline{\\operatorname{diag} G}$.")
st.markdown("**ADMM** (closed form, fp64):")
st.latex(r"\begin{aligned}"
         r"W' &\leftarrow \big(\tilde W G + \rho (Z - U)\big)\,(G + \rho I)^{-1} \\"
         r"Z &\leftarrow \operatorname{Proj}_k(W' + U) \quad\text{(keep the $k$ unit groups of largest saliency)}\\"
         r"U &\leftarrow U + W' - Z, \qquad \rho \leftarrow \min(1.3\,\rho,\ \rho_{\max})"
         r"\end{aligned}")
st.markdown("then the exact least-squares **refit** on the final support (with the bias column: bias compensation):")
st.latex(r"W'_S = (\tilde W G)_{:,S}\,(G_{S,S})^{-1}")
st.markdown("**Saliency of a unit group** $g$ (columns $J_g$): diagonal (Wanda-like) or exact group OBS:")
st.latex(r"\sigma_g^{\text{diag}} = \lVert W_{:,J_g}\rVert_F^2\ \overline{\operatorname{diag} G}_{J_g}, \qquad "
         r"\sigma_g^{\text{obs}} = \operatorname{tr}\Big(W_{:,J_g}\,\big[(G^{-1})_{J_g,J_g}\big]^{-1} W_{:,J_g}^\top\Big)")
st.markdown("**Allocation across layers.** Module energies $E_m$ (mean cost of the units it would lose), "
            "standardized as $z_m$ = z-score of $\\log E_m$, give the Boltzmann allocation at temperature $T$, "
            "clipped to $[s_{\\min}, s_{\\max}]$ and water-filled to meet the budget exactly:")
st.latex(r"B_m = B\,\frac{N_m\, e^{-z_m / T}}{\sum_{m'} N_{m'}\, e^{-z_{m'}/T}},\qquad s_m = B_m / N_m")
st.markdown("$T \\to \\infty$ is uniform; $T \\to 0$ prunes the cheapest modules first. The *threshold* rule "
            "(global structured pruning's) prunes every unit whose cost is below one global $\\tau$. "
            "**Memory:** one layer on the device, activations on the host: with depth and width growing together "
            "one layer is about $\\sqrt{N}$ of $N$ parameters, against $O(N)$ for global methods.")

st.divider()
st.subheader("One module's solve, step by step")


def selector_story(data: dict) -> str:
    """What the three selectors chose, in words: where ADMM's support differs from the others'."""
    errors = data["errors"]
    kept = {e["selector"]: set(e["kept"]) for e in errors}
    rows = ["| selector | units removed | error after refit |", "|---|---|---|"]
    removed = {}
    for e in errors:
        gone = sorted(set(range(data["n_units"])) - kept[e["selector"]])
        removed[e["selector"]] = gone
        rows.append(f"| {e['selector']} | {', '.join(map(str, gone))} | {e['err_after_refit'] / data['output_energy']:.3%} |")
    if removed.get("admm") == removed.get("greedy") == removed.get("saliency"):
        verdict = ("All three selectors remove the same units here, so their errors agree: this module's best "
                   "support is also the one the one-shot saliency finds. The support chart shows ADMM's path to it.")
    elif removed.get("admm") != removed.get("saliency"):
        verdict = ("ADMM moves away from the one-shot saliency support (the iterations above show which units it "
                   "swaps) and lands on a support with a different error.")
    else:
        verdict = "ADMM keeps the saliency support; greedy removal differs."
    return "\n".join(rows) + "\n\n" + verdict
models = available_models()
ui.init({"m_model": ui.default("model") if ui.default("model") in models else models[0], "m_layer": 3,
         "m_kind": "attn", "m_s": ui.default("sparsity")})
c1, c2, c3, c4 = st.columns(4)
model_name = c1.selectbox("Model", models, key="m_model", help=ui.tip("model"))
try:  # the layer box is bounded by the model's own layers (shapes only: no weights are loaded)
    n_layers = int(ui.model_config(model_name).num_hidden_layers)
except Exception:  # noqa: BLE001 - an unreadable config: the solve itself will say what is wrong
    n_layers = 200
if st.session_state["m_layer"] > n_layers - 1:
    st.session_state["m_layer"] = n_layers - 1
layer = c2.number_input(f"Layer (0 to {n_layers - 1})", 0, n_layers - 1, key="m_layer")
kind = c3.radio("Module", ["attn", "mlp"], key="m_kind", horizontal=True,
                format_func={"attn": "attention (o_proj)", "mlp": "MLP (down_proj, slow)"}.get)
sparsity = ui.number(c4, "Sparsity (uniform)", "sparsity", "m_s", positive=True)
key = stepthrough_key(model_name, int(layer), kind, sparsity)
store, runner = ui.store(), ui.runner()
data = store.cache_get(key) or demo_entries("stepthrough").get(key)
if data is None:
    try:  # shapes only: the estimate needs no weights
        stages = stepthrough_stages(ui.model_config(model_name), int(layer), kind, 8, 256, MAX_STEPS)
        est = f"about {ui.fmt_seconds(sum(stages.values()))} on this machine (estimate)"
    except Exception:  # noqa: BLE001 - no estimate is not an error of the step-through
        est = "time unknown for this model"
    st.caption(f"Streams 8 calibration windows of 256 tokens to this layer and runs the engine's solver on its Gram "
               f"matrix: {est}. Cached afterwards.")
    if st.button("Compute the step-through", key="m_compute"):
        try:
            config = ui.model_config(model_name)
            seqlen = min(256, config.max_position_embeddings)

            def work(on_event, cancel):  # loads the model in the job, so Cancel works while it loads
                out = admm_stepthrough(runner.load(model_name, on_event), int(layer), kind, sparsity, nsamples=8,
                                       seqlen=seqlen, on_event=on_event, cancel=cancel)
                store.cache_put(key, out)
                return out

            stages = {**runner.load_stage(model_name, config),
                      **stepthrough_stages(config, int(layer), kind, 8, seqlen, MAX_STEPS)}
            runner.submit_call("stepthrough", f"step-through {model_name} L{layer} {kind}", {"key": key}, work,
                               stages=stages)
        except Exception as exc:  # noqa: BLE001
            ui.show_error(exc)
    job_progress("stepthrough", "m_seen", "The step-through failed", cancel_key="m_cancel")
    st.stop()

tr = data["trace"]
n_it = len(data["supports"]) - 1
st.caption(f"{data['model']}, layer {data['layer']} {data['module']}: keep {data['k_keep']} of {data['n_units']} units "
           f"(uniform {data['sparsity']:.0%})" + (f", {data['kv_groups']} KV groups, equal heads per group"
                                                  if data.get("kv_groups") else "")
           + f"; calibration {data['calibration']['nsamples']}x{data['calibration']['seqlen']}; ADMM started from the "
             f"one-shot saliency support, {tr['iterations']} iterations, converged: {tr['converged']}.")
it = st.slider("Iteration", 0, n_it, n_it, key="m_iter")
kept_now = set(data["supports"][it])
prev = set(data["supports"][max(it - 1, 0)])
m1, m2, m3 = st.columns(3)
m1.metric("Units kept", len(kept_now))
m2.metric("Changed since the previous iteration", len(kept_now ^ prev))
m3.metric("Primal residual", f"{tr['primal_residual'][it - 1]:.2e}" if it > 0 else "start")
sup = pd.DataFrame(support_rows(data, it))
a, b = st.columns(2)
a.plotly_chart(plots.support_figure(sup), key="m_support")
res = pd.DataFrame({"iteration": range(1, tr["iterations"] + 1), "primal_residual": tr["primal_residual"],
                    "dual_residual": tr["dual_residual"], "support_changes": tr["support_changes"]})
b.plotly_chart(plots.residuals_figure(res), key="m_residuals")
err = pd.DataFrame(data["errors"]).assign(energy=data["output_energy"])
st.plotly_chart(plots.refit_selectors_figure(err), key="m_refit")
st.caption("Error = tr((W~ - W') G (W~ - W')^T) on this layer's calibration Gram, as a share of the module's output "
           "energy tr(W~ G W~^T). The refit recovers most of what zeroing the removed units loses.")
st.markdown(selector_story(data))

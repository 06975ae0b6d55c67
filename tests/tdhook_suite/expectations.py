"""What tdhook 0.3.0's own tests can and cannot show about tdhook_fx, with the reason for each.

`OUT_OF_SCOPE`: test files about parts of tdhook that tdhook_fx does not have (they are not
run). `BY_DESIGN`: tests that cannot pass because tdhook_fx compiles interventions into a graph
instead of installing hooks; each reason says which difference. `ENVIRONMENT`: tests that fail
with tdhook 0.3.0 itself on this machine's packages. Every other test of the sdist must pass.
"""

_NOT_HERE = "tdhook_fx does not have this part of tdhook"

OUT_OF_SCOPE = {
    "test_benchmarks.py": f"{_NOT_HERE}: tdhook's repository benchmark scripts (not in the sdist)",
    "test_colab_notebooks.py": f"{_NOT_HERE}: tdhook's notebooks (not in the sdist)",
    "test_concepts.py": f"{_NOT_HERE}: tdhook.concepts (concept relevance on LRP, not implemented)",
    "test_demo_notebooks.py": f"{_NOT_HERE}: tdhook's notebooks (not in the sdist)",
    "test_dimension_workflow.py": f"{_NOT_HERE}: tdhook.dimension and latent.dimension_estimation",
    "test_distributed.py": f"{_NOT_HERE}: tdhook.artifacts (workflow artifact transport)",
    "test_docs_version_switcher.py": f"{_NOT_HERE}: tdhook's documentation sources (not in the sdist)",
    "test_getting_started.py": f"{_NOT_HERE}: tdhook's documentation sources (not in the sdist)",
    "test_meta.py": "tdhook's package metadata (its version, CITATION.cff, docs switcher), not an API",
    "test_notebook_figures.py": f"{_NOT_HERE}: tdhook's notebook figure scripts (not in the sdist)",
    "test_othello_reproduction.py": f"{_NOT_HERE}: tdhook's reproduction scripts (not in the sdist)",
    "test_release_smoke.py": f"{_NOT_HERE}: tdhook's release scripts (not in the sdist)",
    "test_reproduction_notebooks.py": f"{_NOT_HERE}: LRP, concepts, dimension estimation, weight lens",
    "test_rome_reproduction.py": f"{_NOT_HERE}: tdhook's reproduction scripts (not in the sdist)",
}

_HOOKS = (
    "tests tdhook's hook runtime itself (hook registration, HookFactory, MultiHookHandle/Manager, "
    "HookProgramBuilder); tdhook_fx never registers a hook on the model"
)
_HOOK_METHOD = (
    "defines its method with tdhook's hook-runtime extension points (_hook_module, _prepare_module, "
    "_restore_module, HookProgramBuilder); a tdhook_fx method adds statements to a compiled program "
    "(forward / OnePassMethod.build) and never calls those"
)
_INTERNALS = "asserts an internal of tdhook's hook-based contexts that a compiled program does not have"
_PYTHON_AT_CAPTURE = (
    "the model's forward changes Python state or branches on a Python attribute; a compiled program runs the "
    "graph captured once (the forward's Python code runs while capturing, not at each call)"
)
_WEIGHTS_UNTOUCHED = (
    "expects the parameter to be written in place inside the session; tdhook_fx edits the weight where the "
    "compiled graph uses it (set PARAM[...] = v) and never writes the model's weights"
)

BY_DESIGN = {
    **{
        f"test_hooks.py::{name}": _HOOKS
        for name in [
            "TestHookEdgeCases::test_caching_hook_dead_cache_reference_raises",
            "TestHookEdgeCases::test_caching_hook_non_tensor_value_raises",
            "TestHookEdgeCases::test_callback_positional_only_params_rejected",
            "TestHookEdgeCases::test_make_caching_hook_invalid_direction_raises",
            "TestHookEdgeCases::test_make_setting_hook_passes_configured_value_to_callback",
            "TestHookEdgeCases::test_make_setting_hook_type_mismatch_raises",
            "TestHookEdgeCases::test_multihookmanager_default_pattern_matches_nothing",
            "TestHookEdgeCases::test_register_invalid_direction_raises",
            "TestHookEdgeCases::test_varargs_too_many_positional_params_raises",
            "TestHookFactory::test_make_caching_hook",
            "TestHookFactory::test_make_setting_hook",
            "TestHookFactory::test_make_stopping_hook",
            "TestHookFactory::test_setting_hook_none_does_not_change_value[<lambda>]",
            "TestHookFactory::test_setting_hook_none_does_not_change_value[None]",
            "TestHookRegistration::test_multi_hook_manager",
            "TestHookRegistration::test_register_forward_hook",
            "TestHookRegistrationKwargsAndBackward::test_register_backward_and_backward_pre_hooks",
            "TestHookRegistrationKwargsAndBackward::test_register_forward_hook_with_kwargs",
            "TestHookRegistrationKwargsAndBackward::test_register_forward_pre_hook_with_kwargs",
            "TestHookSignatureValidation::test_caching_hook_fwd_pre_kwargs_value_index",
            "TestHookSignatureValidation::test_callback_missing_params_raises",
            "TestHookSignatureValidation::test_invalid_hook_signature_raises",
            "TestMultiHookHandle::test_add_handles_and_remove_all",
            "TestMultiHookHandle::test_context_manager_removes_on_exit",
            "TestMultiHookHandle::test_empty_handle_remove_noop",
            "TestMultiHookManagerPattern::test_pattern_setter_changes_selection",
        ]
    },
    **{
        f"test_runtime.py::{name}": _HOOKS
        for name in [
            "test_program_builder_context_rolls_back_when_registration_fails",
            "test_program_builder_installs_and_removes_hooks_in_reverse_order",
            "test_program_builder_registers_exact_paths_and_rolls_back_resolution_failure",
            "test_program_builder_rejects_invalid_specs_and_reuse",
            "test_program_builder_rejects_invalid_target_hook_specs",
            "test_program_builder_rejects_nonmodules_and_warns_for_module_lists",
            "test_program_builder_rolls_back_partial_registration_and_preserves_first_error",
            "test_temporary_module_state_rejects_hook_specs",
        ]
    },
    "test_runtime.py::test_interactive_and_prepared_capture_share_one_program_model": (
        "compares a method context's hook program with a session's; a tdhook_fx context's program is the "
        "compiled DSL program (hooked.program), a session's is the record of its operations"
    ),
    **{
        f"test_contexts.py::{name}": _HOOK_METHOD
        for name in [
            "TestBaseContext::test_context1",
            "TestBaseContext::test_context2",
            "TestHookingContextLifecycle::test_bound_module_cannot_run_outside_context",
            "TestHookingContextLifecycle::test_disable_context_yields_raw_module",
            "TestHookingContextLifecycle::test_disable_hooks_temporarily",
            "TestHookingContextLifecycle::test_entry_failure_after_hook_installation_removes_the_handle",
            "TestHookingContextLifecycle::test_normal_exit_reports_restore_failure",
            "TestHookingContextLifecycle::test_normal_exit_restores_after_hook_removal_failure",
            "TestTensorDictModuleContext::test_prepare_and_restore_td_module_calls_wrapped_prepare_restore",
        ]
    },
    "test_contexts.py::TestHookingContextLifecycle::test_direct_execution_state_is_scoped_to_an_active_binding": (
        f"{_INTERNALS}: executes_model_directly (a compiled program never executes the caller's module unchanged)"
    ),
    "test_contexts.py::TestHookingContextLifecycle::test_hook_failure_cleanup_requires_an_active_bound_program": (
        f"{_INTERNALS}: on_hook_failure (there is no bound hook program whose hooks could fail)"
    ),
    "test_contexts.py::TestHookingContextLifecycle::test_internal_binding_root_requires_a_tensordict_module_and_relative_path": (
        f"{_INTERNALS}: HookingContext's hook_root / relative_path constructor arguments"
    ),
    "test_contexts.py::TestHookingContextLifecycle::test_normal_exit_reports_pre_context_stack_failure": (
        f"{_INTERNALS}: the context's _stack of pre-contexts (nothing is installed, so nothing is stacked)"
    ),
    "test_modules.py::test_copying_a_wrapper_preserves_independent_model_state_and_attribute_access": (
        f"{_INTERNALS}: HookedModule(td_module, hook_root=...), tdhook 0.3.0's internal wrapper constructor; "
        "tdhook_fx's is HookedModule(module, in_keys, out_keys)"
    ),
    "test_modules.py::test_wrapping_a_model_does_not_duplicate_its_forward_hooks": (
        "expects a forward hook the caller registered on the TensorDictModule to run; the compiled program "
        "replaces the call of that module, so hooks on it are not run"
    ),
    "test_session.py::test_session_rejects_stale_or_incompatible_live_captures": _PYTHON_AT_CAPTURE,
    "test_session.py::test_session_rejects_an_unconsumed_capture_from_an_earlier_execution": _PYTHON_AT_CAPTURE,
    "test_session.py::test_session_stops_forward_execution_and_exposes_partial_results": _PYTHON_AT_CAPTURE,
    "test_session.py::test_session_stop_signal_bypasses_model_exception_handlers": _PYTHON_AT_CAPTURE,
    "test_session.py::test_session_selects_repeated_gradient_occurrence": (
        f"{_PYTHON_AT_CAPTURE} (its forward calls retain_grad and stores tensors on the module)"
    ),
    "test_session.py::test_session_restores_parameters_after_success_and_failure[0-indices0]": _WEIGHTS_UNTOUCHED,
    "test_session.py::test_session_restores_parameters_after_success_and_failure[1-indices1]": _WEIGHTS_UNTOUCHED,
    "test_session.py::test_session_restores_the_live_parameter_after_reference_reassignment": (
        f"{_WEIGHTS_UNTOUCHED}; nothing is restored afterwards, so a weight the caller replaced stays replaced"
    ),
    "test_interventions.py::test_caller_input_gradient_is_restored_and_nested_inputs_are_discovered": (
        "its forward asserts that two arguments are the same tensor object; every module input of a captured "
        "graph is its own site, so identity between arguments is not kept"
    ),
    "test_interventions.py::test_final_structured_output_does_not_alias_restored_module_state": (
        f"{_PYTHON_AT_CAPTURE} (its forward adds to a parameter in place, and returns a TensorDict built inside "
        "forward, which the front ends cannot trace)"
    ),
    "test_interventions.py::test_scalar_intervention_value_has_serializable_provenance": (
        "the model's output does not depend on any input (torch.ones inside forward): the traced graph holds it "
        "as a constant, which is no site to intervene on"
    ),
    "test_interventions.py::test_seeded_optimization_is_deterministic_without_advancing_caller_rng": (
        "forbids torch.manual_seed; capturing a model seeds the RNG (inside fork_rng, the caller's state kept) so "
        "that the eager run and the traced one draw the same dropout masks"
    ),
    "test_workflow.py::test_workflow_keeps_deferred_backward_hooks_until_backward_completes": _HOOK_METHOD,
    "test_workflow.py::test_workflow_cleans_deferred_backward_hooks_when_backward_fails": _HOOK_METHOD,
    "test_workflow.py::test_workflow_rejects_non_tensordict_step_results": _HOOK_METHOD,
    "test_workflow.py::test_deferred_method_non_tensordict_result_closes_its_context": _HOOK_METHOD,
}

ENVIRONMENT = {
    "test_workflow.py::test_workflow_handoff_rejects_malformed_consolidated_metadata[record-without storage metadata]": (
        "fails with tdhook 0.3.0 too: tensordict 0.15's is_consolidated() raises AttributeError on the corrupted record"
    ),
}

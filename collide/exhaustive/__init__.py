"""The exhaustive continuation test: every vocabulary token appended to the closest prompts.

``collide exhaustive RUN_DIR [key=value ...]`` runs ``driver.exhaustive_test`` (keys: ``collide.exhaustive.config.ExhaustiveConfig``; ``--help``).

Mode ``exhaustive`` (the paper's second experiment):

1. Base prompts: the ``n_prompts`` prompts of the run's store whose last-token states are closest
   at ``layer_for_selection`` (rows ordered by their nearest-neighbour distance, i.e. the endpoints
   of the closest pairs first), or an explicit ``prompt_ids=[...]``.
2. Set s = base prompt s + every token t of the token list (``vocab=all``: every row of the input
   embedding; ``vocab=N``: a seeded sample of N ids, the same for every set). The last-token
   state of prefix+t at each selected layer is computed by ``collide.continuations`` (prefix
   once, batched single-token steps against its KV cache) and written into a store of the run,
   ``RUN_DIR/exhaustive/stores/sets<S>-tokens<N>-<hash>/``, keyed by its content (model, run, base
   prompts, token list, layers) as run stores are: another ``n_prompts``, ``vocab`` or layer set
   gets its own store, and a complete store whose first sets and layers cover a test serves it
   without extracting. The store format is ``docs/store-format.md``, one set after the other: set s holds
   prompt ids ``s * n .. (s + 1) * n - 1``, and its prompts table records ``set_index``,
   ``base_prompt_id``, ``appended_token`` and ``appended_text``.
3. The certified search (``collide.search``) runs within each set, streaming the set's shards
   (C(n, 2) pairs per set and layer), and with ``across_sets=true`` over all sets together.
4. ``RUN_DIR/exhaustive/exhaustive.{json,md,png}``; the run's ``report.json`` gains an
   ``"exhaustive"`` object and ``report.md`` an "Exhaustive continuation test" section.

Mode ``margin`` (the paper's appendix): for each of ``n_prompts`` prompts (the first ones of the
run's store, or ``prompt_ids``), ``n_tokens`` seeded single-token continuations; the minimum
pairwise distance among them per layer, and its mean over prompts (``margin.{json,md,png}``,
``report.json["exhaustive_margin"]``). Nothing is stored but the results.

Resume: a killed run resumes at its last committed shard (the store, written shard by shard and
never across a set boundary) and reuses the search results of every finished set
(``RUN_DIR/exhaustive/sets/``). Rerunning the same command on a finished run only rewrites the
reports. Distances are L2, not squared; layer k follows ``collide.layers.CONVENTION``.

Modules: ``driver`` (the whole test, ``exhaustive_test``), ``config`` (its schema), ``inputs`` (what the test reads from the run), ``sets`` (a prompt set's search and its
results file), ``modes`` (the two modes); the Markdown is ``collide.report.markdown``'s and the
run's report is extended through ``collide.report.add_section``; the command is ``collide.commands.exhaustive``.
"""

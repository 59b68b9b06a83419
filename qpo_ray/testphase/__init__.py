"""The test phase: the run's policies against the baselines on queries never chosen on.
`evaluate` runs it (choice on dev, one scoring pass, the report), `methods` maps each method
to a prompt per query, `decoding` turns policies into prompts, `calibration` fits mbr's
belief temperature, `selectors` holds the Prompt-OIRL-style selection baselines, `stats`
the paired statistics, `render` the report files, `plots` the figures."""

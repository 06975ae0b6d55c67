"""LRP helpers at tdhook's paths: the rules (`rules`), the composites that map modules to rules
(`rules.BaseRuleMapper`, `rules.EpsilonPlus`), the layer type groups (`types`) and `layers.Sum`."""

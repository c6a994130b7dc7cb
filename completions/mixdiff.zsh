#compdef mixdiff

_mixdiff_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _MIXDIFF_COMPLETE=complete_zsh mixdiff)
}

compdef _mixdiff_completion mixdiff

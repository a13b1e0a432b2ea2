# Run the test suite (the same command as README.md and CI).
$ErrorActionPreference = "Stop"
Set-Location -Path $PSScriptRoot
python -m pytest -q @args
exit $LASTEXITCODE

# Sourced by tools/issue*_gpu.sh. When several parts share one device call (600 s at most), set UNTIL once in the call
# (UNTIL=$(( $(date +%s) + 585 ))): `budget S` is S seconds capped by what is left before UNTIL, so a late part gets
# a shorter timeout instead of the call being killed with nothing packed.
budget() {
    local left=$(( ${UNTIL:-9999999999} - $(date +%s) ))
    if (( left < $1 )); then echo $(( left > 5 ? left : 5 )); else echo "$1"; fi
}

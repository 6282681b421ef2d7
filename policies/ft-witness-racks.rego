# METADATA
# title: Fault-tolerant VMs need a witness and two racks
# description: An FT pair survives a rack loss only with its halves in two racks, and avoids split brain only with a quorum witness.
# custom:
#   enforcement: hard-mandatory
package cairn.ft

import rego.v1

sites := {s.name: s | some s in input.sites}

node_rack := {n.name: n.rack | some s in input.sites; some n in s.nodes}

deny contains msg if {
	some vm in input.vms
	vm.availability == "ft"
	object.get(sites[vm.site], "witness", null) == null
	msg := sprintf("vm %s: availability ft needs a quorum witness, and site %s has none (add `witness address=\"HOST:PORT\"` to the site)", [vm.name, vm.site])
}

deny contains msg if {
	some vm in input.vms
	vm.availability == "ft"
	n := count(sites[vm.site].racks)
	n < 2
	msg := sprintf("vm %s: availability ft needs two racks so the pair survives a rack loss, and site %s has %d", [vm.name, vm.site, n])
}

# With a placement: the primary and the secondary must sit in distinct racks.
deny contains msg if {
	some p in input.placement.vms
	p.node != null
	object.get(p, "secondary", null) != null
	node_rack[p.node] == node_rack[p.secondary]
	msg := sprintf("vm %s: primary on %s and secondary on %s share rack %s", [p.name, p.node, p.secondary, node_rack[p.node]])
}

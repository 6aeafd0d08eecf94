// The sockmap relay experiment (issue 15): a stream verdict program that sends every
// segment a socket receives to its peer's send queue inside the kernel. A socket's peer
// is found by socket cookie; bytes are counted per direction, as l4lb's relay counts them.
// Built by benches/sockmap/run.sh with clang; not part of l4lb (it lost to splice/copy).
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct link {
	__u64 peer;  /* the peer socket's cookie */
	__u64 bytes; /* bytes received on this socket and redirected */
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, __u64); /* socket cookie */
	__type(value, __u64);
} sockets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64); /* socket cookie */
	__type(value, struct link);
} links SEC(".maps");

SEC("sk_skb/stream_verdict")
int relay(struct __sk_buff *skb)
{
	__u64 cookie = bpf_get_socket_cookie(skb);
	struct link *l = bpf_map_lookup_elem(&links, &cookie);

	if (!l)
		return SK_PASS;
	__sync_fetch_and_add(&l->bytes, skb->len);
	return bpf_sk_redirect_hash(skb, &sockets, &l->peer, 0);
}

char _license[] SEC("license") = "GPL";

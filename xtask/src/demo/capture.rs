//! Reads what tcpdump wrote (`-w`, classic pcap on an Ethernet link) and
//! says what crossed the wire: how many packets, and whether every TCP
//! payload byte, each direction of each connection put back in order, is
//! part of a TLS record.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{Result, bail};

const LINKTYPE_ETHERNET: u32 = 1;
/// The largest TLS record a peer may send (RFC 8446 §5.2: 2^14 + 256).
const MAX_RECORD: usize = (1 << 14) + 256;
const APPLICATION_DATA: u8 = 23;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub packets: usize,
    /// TCP connections seen (a connection's two directions count once).
    pub connections: usize,
    pub payload_bytes: usize,
    pub tls_records: usize,
    pub application_data: usize,
    /// TCP payload bytes that are not inside a TLS record.
    pub not_tls: usize,
    /// Times the marker appears anywhere in the capture, headers included.
    pub marker_hits: usize,
}

/// One direction of a TCP connection: its segments by sequence number.
#[derive(Default)]
struct Direction {
    /// The sequence number of the SYN, if it was captured.
    syn: Option<u32>,
    segments: Vec<(u32, Vec<u8>)>,
}

pub fn summarize(pcap: &[u8], marker: &[u8]) -> Result<Summary> {
    let mut summary = Summary {
        marker_hits: count(pcap, marker),
        ..Summary::default()
    };
    let Some(header) = pcap.get(..24) else {
        bail!(
            "not a pcap file: {} bytes, shorter than its header",
            pcap.len()
        );
    };
    let u32_at = match header[..4] {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => u32::from_le_bytes,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => u32::from_be_bytes,
        _ => bail!("not a classic pcap file (magic {:02x?})", &header[..4]),
    };
    let word = |b: &[u8], at: usize| u32_at([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let linktype = word(header, 20) & 0xffff;
    if linktype != LINKTYPE_ETHERNET {
        bail!("the capture's link type is {linktype}, not Ethernet");
    }
    let mut flows: BTreeMap<(SocketAddr, SocketAddr), Direction> = BTreeMap::new();
    let mut at = 24;
    while at < pcap.len() {
        let Some(record) = pcap.get(at..at + 16) else {
            bail!("the capture ends inside a packet header (offset {at})");
        };
        let (caplen, len) = (word(record, 8) as usize, word(record, 12) as usize);
        let Some(frame) = pcap.get(at + 16..at + 16 + caplen) else {
            bail!("the capture ends inside a packet (offset {at})");
        };
        if caplen < len {
            bail!("the capture cut packets short ({caplen} of {len} bytes): run tcpdump with -s 0");
        }
        summary.packets += 1;
        if let Some((from, to, syn, seq, payload)) = tcp(frame) {
            let dir = flows.entry((from, to)).or_default();
            if syn {
                dir.syn = Some(seq);
            }
            if !payload.is_empty() {
                dir.segments.push((seq, payload.to_vec()));
            }
        }
        at += 16 + caplen;
    }
    let mut pairs = std::collections::BTreeSet::new();
    for ((from, to), dir) in flows {
        pairs.insert(if from < to { (from, to) } else { (to, from) });
        let stream = reassemble(dir);
        summary.payload_bytes += stream.len();
        let (records, app, rest) = tls_records(&stream);
        summary.tls_records += records;
        summary.application_data += app;
        summary.not_tls += rest;
    }
    summary.connections = pairs.len();
    Ok(summary)
}

/// (source, destination, SYN set, sequence number, payload) of a TCP
/// segment in an Ethernet frame; None for anything else.
fn tcp(frame: &[u8]) -> Option<(SocketAddr, SocketAddr, bool, u32, &[u8])> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(14..)?;
    let (src, dst, segment) = match ethertype {
        0x0800 => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
            if *ip.get(9)? != 6 || ihl < 20 {
                return None;
            }
            let src = Ipv4Addr::from(<[u8; 4]>::try_from(ip.get(12..16)?).ok()?);
            let dst = Ipv4Addr::from(<[u8; 4]>::try_from(ip.get(16..20)?).ok()?);
            // The IP length, not the frame's: Ethernet may pad short frames.
            (IpAddr::V4(src), IpAddr::V4(dst), ip.get(ihl..total)?)
        }
        0x86dd => {
            let payload = usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
            // Only TCP right after the fixed header; the demo sends no
            // extension headers.
            if *ip.get(6)? != 6 {
                return None;
            }
            let src = Ipv6Addr::from(<[u8; 16]>::try_from(ip.get(8..24)?).ok()?);
            let dst = Ipv6Addr::from(<[u8; 16]>::try_from(ip.get(24..40)?).ok()?);
            (IpAddr::V6(src), IpAddr::V6(dst), ip.get(40..40 + payload)?)
        }
        _ => return None,
    };
    let port = |at: usize| {
        Some(u16::from_be_bytes([
            *segment.get(at)?,
            *segment.get(at + 1)?,
        ]))
    };
    let seq = u32::from_be_bytes(<[u8; 4]>::try_from(segment.get(4..8)?).ok()?);
    let offset = usize::from(segment.get(12)? >> 4) * 4;
    let syn = segment.get(13)? & 0x02 != 0;
    Some((
        SocketAddr::new(src, port(0)?),
        SocketAddr::new(dst, port(2)?),
        syn,
        seq,
        segment.get(offset..)?,
    ))
}

/// The bytes of one direction in order, retransmissions once. A gap (a
/// segment the capture missed) ends the stream there.
fn reassemble(mut dir: Direction) -> Vec<u8> {
    let Some(first) = dir.segments.first().map(|s| s.0) else {
        return Vec::new();
    };
    // The byte after the SYN is the stream's first; without the SYN, the
    // earliest captured segment is.
    let base = dir.syn.map_or(first, |s| s.wrapping_add(1));
    dir.segments.sort_by_key(|(seq, _)| seq.wrapping_sub(base));
    let mut stream: Vec<u8> = Vec::new();
    for (seq, data) in dir.segments {
        let at = seq.wrapping_sub(base) as usize;
        if at > stream.len() {
            break;
        }
        let new = (at + data.len()).saturating_sub(stream.len());
        stream.extend_from_slice(&data[data.len() - new..]);
    }
    stream
}

/// Walks a stream as TLS records: (records, application-data records, bytes
/// from the first thing that is not a record header to the end). A record
/// the capture ended inside still counts.
fn tls_records(stream: &[u8]) -> (usize, usize, usize) {
    let (mut records, mut app, mut at) = (0, 0, 0);
    while at < stream.len() {
        let Some(h) = stream.get(at..at + 5) else {
            break;
        };
        let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
        let known_type = (20..=23).contains(&h[0]);
        if !known_type || h[1] != 3 || !(1..=4).contains(&h[2]) || len > MAX_RECORD {
            break;
        }
        records += 1;
        app += usize::from(h[0] == APPLICATION_DATA);
        at = (at + 5 + len).min(stream.len());
    }
    (records, app, stream.len() - at)
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    if needle.is_empty() {
        return 0;
    }
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pcap(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut out = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&262144u32.to_le_bytes());
        out.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        for f in frames {
            out.extend_from_slice(&[0; 8]);
            out.extend_from_slice(&(f.len() as u32).to_le_bytes());
            out.extend_from_slice(&(f.len() as u32).to_le_bytes());
            out.extend_from_slice(f);
        }
        out
    }

    /// An Ethernet + IPv4 + TCP frame between 10.0.0.1 and 10.0.0.2 (the
    /// server, the side of port 15008), padded as a short Ethernet frame
    /// may be.
    fn segment(sport: u16, dport: u16, seq: u32, syn: bool, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0; 12];
        f.extend_from_slice(&[0x08, 0x00]);
        let total = (20 + 20 + payload.len()) as u16;
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&total.to_be_bytes());
        let (from, to) = if sport == 15008 { (2, 1) } else { (1, 2) };
        f.extend_from_slice(&[0, 0, 0, 0, 64, 6, 0, 0, 10, 0, 0, from, 10, 0, 0, to]);
        f.extend_from_slice(&sport.to_be_bytes());
        f.extend_from_slice(&dport.to_be_bytes());
        f.extend_from_slice(&seq.to_be_bytes());
        f.extend_from_slice(&[
            0,
            0,
            0,
            0,
            0x50,
            if syn { 0x02 } else { 0x18 },
            0,
            0,
            0,
            0,
            0,
            0,
        ]);
        f.extend_from_slice(payload);
        f.extend_from_slice(&[0; 6]);
        f
    }

    fn record(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut r = vec![kind, 3, 3];
        r.extend_from_slice(&(body.len() as u16).to_be_bytes());
        r.extend_from_slice(body);
        r
    }

    #[test]
    fn tls_split_across_segments_and_retransmitted_is_all_records() {
        let mut stream = record(22, &[1; 40]);
        stream.extend(record(23, &[7; 300]));
        stream.extend(record(23, &[9; 10]));
        let (a, b) = stream.split_at(100);
        let frames = [
            segment(40000, 15008, 999, true, &[]),
            segment(40000, 15008, 1000 + 100, false, b),
            segment(40000, 15008, 1000, false, a),
            segment(40000, 15008, 1000, false, a),
            segment(15008, 40000, 5000, false, &record(23, &[3; 20])),
        ];
        let s = summarize(&pcap(&frames), b"marker").unwrap();
        assert_eq!(
            s,
            Summary {
                packets: 5,
                connections: 1,
                payload_bytes: stream.len() + 25,
                tls_records: 4,
                application_data: 3,
                not_tls: 0,
                marker_hits: 0,
            }
        );
    }

    #[test]
    fn plaintext_is_neither_tls_nor_hidden() {
        let frames = [segment(40000, 9000, 1, false, b"GET / marker")];
        let s = summarize(&pcap(&frames), b"marker").unwrap();
        assert_eq!((s.tls_records, s.not_tls, s.marker_hits), (0, 12, 1));
    }

    #[test]
    fn refuses_what_is_not_a_pcap() {
        assert!(summarize(b"hello, this is not a capture file", b"m").is_err());
    }
}

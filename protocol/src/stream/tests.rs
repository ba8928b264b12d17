//! The stream transport against itself: keys from a real handshake, and every way a gateway could
//! cut, move or splice a stream.

use bytes::BytesMut;

use super::*;
use crate::payload::Message;
use crate::tests::Pair;

/// A device and a core stream for one connection of `upload`, keyed from a fresh handshake.
fn streams(salt: [u8; 16], upload: UploadId) -> (DeviceStream, CoreStream) {
    let mut p = Pair::new();
    p.handshake(7, 9);
    let device = p
        .device
        .current()
        .expect("established")
        .stream_keys(&salt, &upload);
    let core = p
        .core_session
        .as_ref()
        .expect("core")
        .stream_keys(&salt, &upload);
    (DeviceStream::new(device), CoreStream::new(core))
}

/// Strips the length prefix of one sealed frame, checking it.
fn body(sealed: &[u8]) -> &[u8] {
    let mut b = BytesMut::from(sealed);
    let frame = split_frame(&mut b).expect("length").expect("whole");
    assert!(b.is_empty());
    &sealed[LENGTH_PREFIX..LENGTH_PREFIX + frame.len()]
}

fn open() -> StreamOpen {
    StreamOpen {
        salt: [1; 16],
        upload: UploadId([2; 16]),
        chunk_size: 65_536,
        total_size: 200_000,
        meta: "accident, camera 4".into(),
    }
}

#[test]
fn chunks_and_acks_round_trip_under_derived_keys() {
    let (device, mut core) = streams([1; 16], UploadId([2; 16]));
    let data = vec![0xAB; MAX_CHUNK];
    let mut sealed = Vec::new();
    device.seal_chunk(0, false, &data, &mut sealed).unwrap();
    assert_eq!(sealed.len(), LENGTH_PREFIX + MAX_STREAM_FRAME);
    assert!(
        !sealed.windows(32).any(|w| w == &data[..32]),
        "ciphertext only"
    );
    let mut out = Vec::new();
    let chunk = core.open_chunk(body(&sealed), &mut out).unwrap();
    assert_eq!(
        chunk,
        Chunk {
            index: 0,
            last: false
        }
    );
    assert_eq!(out, data);

    let mut device = device;
    for n in 0..3u32 {
        let mut ack = Vec::new();
        let mut said = StreamAck::receiving(n + 1, u64::from(n + 1) * 65_536);
        if n == 2 {
            said.status = AckStatus::Complete;
            said.sha256 = [9; 32];
        }
        core.seal_ack(&said, &mut ack).unwrap();
        assert_eq!(ack.len(), LENGTH_PREFIX + ACK_FRAME);
        assert_eq!(device.open_ack(body(&ack)).unwrap(), said);
    }
}

#[test]
fn a_moved_chunk_fails_to_open() {
    let (device, core) = streams([1; 16], UploadId([2; 16]));
    let mut sealed = Vec::new();
    device
        .seal_chunk(3, false, b"frame three", &mut sealed)
        .unwrap();
    let mut moved = body(&sealed).to_vec();
    moved[3..7].copy_from_slice(&4u32.to_be_bytes());
    let mut out = Vec::new();
    assert_eq!(
        core.open_chunk(&moved, &mut out),
        Err(StreamError::Authentication)
    );
    assert!(out.is_empty(), "no unauthenticated plaintext is handed out");
}

#[test]
fn the_final_flag_cannot_be_added_or_removed() {
    let (device, core) = streams([1; 16], UploadId([2; 16]));
    let mut out = Vec::new();
    for last in [false, true] {
        let mut sealed = Vec::new();
        device.seal_chunk(1, last, b"tail", &mut sealed).unwrap();
        let mut flipped = body(&sealed).to_vec();
        flipped[2] ^= FLAG_FINAL;
        assert_eq!(
            core.open_chunk(&flipped, &mut out),
            Err(StreamError::Authentication)
        );
        assert_eq!(core.open_chunk(body(&sealed), &mut out).unwrap().last, last);
    }
}

#[test]
fn a_chunk_from_another_connection_or_upload_does_not_open() {
    let (device_a, _) = streams([1; 16], UploadId([2; 16]));
    let (_, core_b) = streams([1; 16], UploadId([2; 16]));
    let mut sealed = Vec::new();
    device_a
        .seal_chunk(0, false, b"chunk", &mut sealed)
        .unwrap();
    let mut out = Vec::new();
    // Another session (another device or another handshake): other keys.
    assert_eq!(
        core_b.open_chunk(body(&sealed), &mut out),
        Err(StreamError::Authentication)
    );
    // The same session, another salt (a resumed connection) or another upload.
    let mut p = Pair::new();
    p.handshake(1, 2);
    let t_dev = p.device.current().unwrap();
    let t_core = p.core_session.as_ref().unwrap();
    let device = DeviceStream::new(t_dev.stream_keys(&[1; 16], &UploadId([2; 16])));
    let mut sealed = Vec::new();
    device.seal_chunk(0, false, b"chunk", &mut sealed).unwrap();
    for (salt, upload) in [([3; 16], UploadId([2; 16])), ([1; 16], UploadId([4; 16]))] {
        let core = CoreStream::new(t_core.stream_keys(&salt, &upload));
        assert_eq!(
            core.open_chunk(body(&sealed), &mut out),
            Err(StreamError::Authentication)
        );
    }
    let core = CoreStream::new(t_core.stream_keys(&[1; 16], &UploadId([2; 16])));
    assert!(core.open_chunk(body(&sealed), &mut out).is_ok());
}

#[test]
fn acks_must_come_in_order_and_authenticate() {
    let (mut device, mut core) = streams([5; 16], UploadId([6; 16]));
    let mut first = Vec::new();
    core.seal_ack(&StreamAck::receiving(0, 0), &mut first)
        .unwrap();
    let mut second = Vec::new();
    core.seal_ack(&StreamAck::receiving(16, 1 << 20), &mut second)
        .unwrap();
    assert_eq!(
        device.open_ack(body(&second)),
        Err(StreamError::OutOfOrder {
            expected: 0,
            got: 1
        })
    );
    let mut forged = body(&first).to_vec();
    forged[10] ^= 1;
    assert_eq!(device.open_ack(&forged), Err(StreamError::Authentication));
    assert!(device.open_ack(body(&first)).is_ok());
    assert_eq!(device.open_ack(body(&second)).unwrap().next_chunk, 16);
    // A replayed ack is out of order.
    assert!(device.open_ack(body(&first)).is_err());
}

#[test]
fn lengths_are_checked_before_the_body_is_buffered() {
    let mut b = BytesMut::from(&0u32.to_be_bytes()[..]);
    assert_eq!(split_frame(&mut b), Err(StreamError::TooLarge(0)));
    let mut b = BytesMut::from(&((MAX_STREAM_FRAME as u32) + 1).to_be_bytes()[..]);
    assert!(matches!(split_frame(&mut b), Err(StreamError::TooLarge(_))));
    let mut b = BytesMut::from(&[0u8, 0, 0][..]);
    assert_eq!(split_frame(&mut b), Ok(None));
    let mut b = BytesMut::from(&[0u8, 0, 0, 3, 1, 2][..]);
    assert_eq!(split_frame(&mut b), Ok(None));
    b.extend_from_slice(&[3, 0, 0, 0, 1]);
    assert_eq!(split_frame(&mut b).unwrap().unwrap().as_ref(), &[1, 2, 3]);
    assert_eq!(b.as_ref(), &[0, 0, 0, 1]);
}

#[test]
fn stream_open_round_trips_inside_a_message_and_rejects_bad_fields() {
    let o = open();
    let bytes = Message::StreamOpen(o.clone()).to_vec();
    assert_eq!(bytes.len(), 1 + o.encoded_len());
    assert_eq!(
        Message::decode(&bytes).unwrap(),
        Message::StreamOpen(o.clone())
    );
    assert_eq!(o.chunks(), 4);
    assert_eq!(o.chunk_len(3), 200_000 - 3 * 65_536);
    assert_eq!(o.chunk_len(4), 0);

    for (at, value) in [
        (1 + 32, 0u8),   // chunk size 0x00.. (too small)
        (1 + 32 + 1, 2), // chunk size > 64 KiB
    ] {
        let mut bad = bytes.clone();
        bad[at] = value;
        if at == 1 + 32 {
            bad[at + 1] = 0;
            bad[at + 2] = 0;
            bad[at + 3] = 0;
        }
        assert!(Message::decode(&bad).is_err(), "byte {at}");
    }
    let mut zero = o.clone();
    zero.total_size = 0;
    assert!(Message::decode(&Message::StreamOpen(zero).to_vec()).is_err());
    let mut huge = o.clone();
    huge.total_size = MAX_TOTAL_SIZE + 1;
    assert!(Message::decode(&Message::StreamOpen(huge).to_vec()).is_err());
    assert!(Message::decode(&bytes[..bytes.len() - 1]).is_err());
    let mut longer = bytes.clone();
    longer.push(b'x');
    assert!(Message::decode(&longer).is_err());
    let mut not_utf8 = bytes.clone();
    let last = not_utf8.len() - 1;
    not_utf8[last] = 0xFF;
    assert!(Message::decode(&not_utf8).is_err());
}

#[test]
fn long_metadata_is_cut_at_a_character_boundary() {
    let mut o = open();
    o.meta = "é".repeat(150); // 300 bytes
    let bytes = Message::StreamOpen(o).to_vec();
    let Message::StreamOpen(back) = Message::decode(&bytes).unwrap() else {
        panic!("not an open")
    };
    assert_eq!(back.meta.len(), MAX_META);
}

#[test]
fn refuse_reasons_round_trip_through_their_codes() {
    let all = [
        RefuseReason::TooLarge,
        RefuseReason::ChunkSize,
        RefuseReason::Busy,
        RefuseReason::SizeMismatch,
        RefuseReason::NotPermitted,
    ];
    for (i, r) in all.iter().enumerate() {
        assert_eq!(*r as u8, i as u8 + 1);
        assert_eq!(RefuseReason::from_code(*r as u8), Some(*r));
        assert!(all[..i].iter().all(|o| o.label() != r.label()));
    }
    assert_eq!(RefuseReason::from_code(0), None);
    assert_eq!(RefuseReason::from_code(6), None);
    assert_eq!(RefuseReason::NotPermitted.label(), "not_permitted");
}
